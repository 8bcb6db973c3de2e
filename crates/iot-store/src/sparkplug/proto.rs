//! The Sparkplug B payload as protobuf: `Payload` and its `Metric`s, with the field
//! numbers and types of the specification's `sparkplug_b.proto` (Sparkplug 3.0,
//! section 6.4), through prost's derive. Only what the host reads is declared: metadata
//! (8) and properties (9) are skipped by prost as unknown fields, and the values the
//! host does not read (DataSet 17, Template 18, extension 19) are kept as their raw
//! bytes, which is how protobuf lays a nested message out.

/// A Sparkplug B message's payload.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Payload {
    /// When the message was sent, ms since 1970.
    #[prost(uint64, optional, tag = "1")]
    pub timestamp: Option<u64>,
    #[prost(message, repeated, tag = "2")]
    pub metrics: Vec<Metric>,
    /// 0–255, one more per message of an edge node, 0 in its birth.
    #[prost(uint64, optional, tag = "3")]
    pub seq: Option<u64>,
    #[prost(string, optional, tag = "4")]
    pub uuid: Option<String>,
    #[prost(bytes = "vec", optional, tag = "5")]
    pub body: Option<Vec<u8>>,
}

/// One metric: named in a birth (with the alias data messages may use instead), typed
/// by `datatype` there.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Metric {
    #[prost(string, optional, tag = "1")]
    pub name: Option<String>,
    #[prost(uint64, optional, tag = "2")]
    pub alias: Option<u64>,
    /// When the value was taken, ms since 1970.
    #[prost(uint64, optional, tag = "3")]
    pub timestamp: Option<u64>,
    /// A [`DataType`] number.
    #[prost(uint32, optional, tag = "4")]
    pub datatype: Option<u32>,
    #[prost(bool, optional, tag = "5")]
    pub is_historical: Option<bool>,
    #[prost(bool, optional, tag = "6")]
    pub is_transient: Option<bool>,
    #[prost(bool, optional, tag = "7")]
    pub is_null: Option<bool>,
    #[prost(
        oneof = "metric::Value",
        tags = "10, 11, 12, 13, 14, 15, 16, 17, 18, 19"
    )]
    pub value: Option<metric::Value>,
}

pub mod metric {
    /// A metric's value, in the field its datatype uses.
    #[derive(Clone, PartialEq, prost::Oneof)]
    pub enum Value {
        /// Int8, Int16, Int32 (two's complement in as many bits), UInt8, UInt16, UInt32.
        #[prost(uint32, tag = "10")]
        IntValue(u32),
        /// Int64 (two's complement), UInt64, DateTime.
        #[prost(uint64, tag = "11")]
        LongValue(u64),
        #[prost(float, tag = "12")]
        FloatValue(f32),
        #[prost(double, tag = "13")]
        DoubleValue(f64),
        #[prost(bool, tag = "14")]
        BooleanValue(bool),
        /// String, Text, UUID.
        #[prost(string, tag = "15")]
        StringValue(String),
        /// Bytes, File, and the array types.
        #[prost(bytes = "vec", tag = "16")]
        BytesValue(Vec<u8>),
        #[prost(bytes = "vec", tag = "17")]
        DatasetValue(Vec<u8>),
        #[prost(bytes = "vec", tag = "18")]
        TemplateValue(Vec<u8>),
        #[prost(bytes = "vec", tag = "19")]
        ExtensionValue(Vec<u8>),
    }
}

/// The datatypes of the specification (`DataType` in `sparkplug_b.proto`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DataType {
    Int8,
    Int16,
    Int32,
    Int64,
    UInt8,
    UInt16,
    UInt32,
    UInt64,
    Float,
    Double,
    Boolean,
    /// Anything else (String 12 … DateTimeArray 34, Unknown 0, or a number the
    /// specification does not define): not a measurement.
    Other(u32),
}

impl DataType {
    pub fn from_number(number: u32) -> DataType {
        match number {
            1 => DataType::Int8,
            2 => DataType::Int16,
            3 => DataType::Int32,
            4 => DataType::Int64,
            5 => DataType::UInt8,
            6 => DataType::UInt16,
            7 => DataType::UInt32,
            8 => DataType::UInt64,
            9 => DataType::Float,
            10 => DataType::Double,
            11 => DataType::Boolean,
            other => DataType::Other(other),
        }
    }

    pub fn number(self) -> u32 {
        match self {
            DataType::Int8 => 1,
            DataType::Int16 => 2,
            DataType::Int32 => 3,
            DataType::Int64 => 4,
            DataType::UInt8 => 5,
            DataType::UInt16 => 6,
            DataType::UInt32 => 7,
            DataType::UInt64 => 8,
            DataType::Float => 9,
            DataType::Double => 10,
            DataType::Boolean => 11,
            DataType::Other(number) => number,
        }
    }

    /// The specification's name of the type, for logs and flagged documents.
    pub fn name(self) -> &'static str {
        const NAMES: [&str; 35] = [
            "Unknown",
            "Int8",
            "Int16",
            "Int32",
            "Int64",
            "UInt8",
            "UInt16",
            "UInt32",
            "UInt64",
            "Float",
            "Double",
            "Boolean",
            "String",
            "DateTime",
            "Text",
            "UUID",
            "DataSet",
            "Bytes",
            "File",
            "Template",
            "PropertySet",
            "PropertySetList",
            "Int8Array",
            "Int16Array",
            "Int32Array",
            "Int64Array",
            "UInt8Array",
            "UInt16Array",
            "UInt32Array",
            "UInt64Array",
            "FloatArray",
            "DoubleArray",
            "BooleanArray",
            "StringArray",
            "DateTimeArray",
        ];
        usize::try_from(self.number())
            .ok()
            .and_then(|index| NAMES.get(index))
            .copied()
            .unwrap_or("undefined")
    }

    /// The value as a measurement: numbers as doubles (signed types from their two's
    /// complement), booleans 1 and 0; none for a value of another field than the type's.
    pub fn measure(self, value: &metric::Value) -> Option<f64> {
        use metric::Value::{BooleanValue, DoubleValue, FloatValue, IntValue, LongValue};
        // The casts keep the low bits, which hold the value in two's complement.
        #[allow(clippy::cast_possible_truncation, clippy::cast_possible_wrap)]
        let measured = match (self, value) {
            (DataType::Int8, IntValue(v)) => f64::from(*v as u8 as i8),
            (DataType::Int16, IntValue(v)) => f64::from(*v as u16 as i16),
            (DataType::Int32, IntValue(v)) => f64::from(*v as i32),
            (DataType::UInt8 | DataType::UInt16 | DataType::UInt32, IntValue(v)) => f64::from(*v),
            (DataType::Int64, LongValue(v)) => *v as i64 as f64,
            (DataType::UInt64, LongValue(v)) => *v as f64,
            (DataType::Float, FloatValue(v)) => f64::from(*v),
            (DataType::Double, DoubleValue(v)) => *v,
            (DataType::Boolean, BooleanValue(v)) => f64::from(u8::from(*v)),
            _ => return None,
        };
        measured.is_finite().then_some(measured)
    }
}
