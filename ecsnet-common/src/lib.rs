//! Types shared by the datapath (`ecsnet-ebpf`) and user space (`ecsnet-userspace`).
//! Everything here is `#[repr(C)]` with explicit padding and a size assert, so the two sides
//! cannot disagree about a layout; the `user` feature adds the `aya::Pod` impls.
#![no_std]

pub mod csum;
pub mod ct;
pub mod drop;
pub mod flow;
pub mod maps;
pub mod net;
pub mod policy;

pub use drop::DropReason;
