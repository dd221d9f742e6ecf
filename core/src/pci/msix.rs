//! Placeholder: MSI-X (being written).
#![allow(missing_docs)]
pub struct Msix;
