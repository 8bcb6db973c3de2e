//! Topic names of the pipeline, kept compatible with the seed scripts (leading slash).

/// Temperature readings, published by `temperature-sensor`.
pub const TEMPERATURE: &str = "/sensor/temperature";
/// Pressure readings, published by `pressure-sensor`.
pub const PRESSURE: &str = "/sensor/pressure";
/// Device presence (`online` / `offline`), published by `device-status` and its will.
pub const DEVICE_STATUS: &str = "/device/status";
/// Everything, as the catch-all subscriber reads it.
pub const ALL: &str = "#";
