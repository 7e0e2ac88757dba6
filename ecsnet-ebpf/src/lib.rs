// This library target exists only so that ecsnet-userspace can name this crate as a
// build-dependency (which makes cargo rebuild it when the datapath changes); the programs are
// in the `ecsnet` binary target, built for bpfel-unknown-none by aya-build.
#![no_std]
