//! Placeholder: type-0 configuration space (being written).
#![allow(missing_docs)]
pub struct Bar;
pub enum BarKind {}
pub enum Capability {}
pub struct ConfigSpace;
pub struct ConfigSpaceBuilder;
