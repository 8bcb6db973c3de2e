//! Topic names of the pipeline, kept compatible with the seed scripts (leading slash).

/// Temperature readings, published by `temperature-sensor`.
pub const TEMPERATURE: &str = "/sensor/temperature";
/// Pressure readings, published by `pressure-sensor`.
pub const PRESSURE: &str = "/sensor/pressure";
/// Device presence (`online` / `offline`), published by `device-status` and its will.
pub const DEVICE_STATUS: &str = "/device/status";
/// Every sensor topic, as the persister stores them (the seed's cloud script said
/// `sensors/#`, which matches none of them).
pub const SENSORS: &str = "/sensor/#";
/// Every device status: the seed's `/device/status` and a fleet's
/// `/device/<device>/status`, as the persister stores them.
pub const DEVICES: &str = "/device/#";
/// Everything, as the catch-all subscriber reads it.
pub const ALL: &str = "#";
