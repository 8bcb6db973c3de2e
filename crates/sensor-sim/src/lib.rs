//! `sensor-sim`: the simulated devices. The sensor service that the
//! `temperature-sensor` and `pressure-sensor` binaries run ([`sensor`]), and the fleets
//! of devices one process can play ([`fleet`]: device ids, their topics, the pacing of
//! their readings), which `device-status` uses too, and what each device keeps of what
//! it sent, to send it again when asked ([`replay`]).

pub mod fleet;
pub mod replay;
pub mod sensor;
