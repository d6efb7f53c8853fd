//! One module per scenario of the product, each its own test and namespace.

pub mod autoscaling;
pub mod bad_input;
pub mod blue_green;
pub mod compliance;
pub mod faults;
pub mod gateway;
pub mod gateway_route;
pub mod install;
pub mod lifecycle;
pub mod output_agreement;
pub mod scale_from_zero;
