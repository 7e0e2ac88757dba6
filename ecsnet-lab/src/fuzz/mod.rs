//! Fuzzing the datapath against a model (docs/FUZZING.md): `model` says what the ingress
//! programs must do to a frame, `r#gen` makes episodes (a host and its frames) from a seed, `run`
//! runs them through the real programs with `BPF_PROG_TEST_RUN` and compares verdicts, output
//! bytes and maps with the model.

pub mod r#gen;
pub mod model;
pub mod run;
