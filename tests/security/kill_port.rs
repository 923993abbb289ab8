//! The kill port admits only a proven, allowed, live peer that says `stop` or nothing.

#[allow(unused_imports)]
use super::common::*;
