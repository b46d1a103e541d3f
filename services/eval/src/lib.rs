//! Evaluation of code models: a sandbox that runs generated programs ([`sandbox`]), HumanEval
//! problems and how a completion becomes a program ([`humaneval`]), infilling tasks built from
//! their canonical solutions ([`infill`]), and the pass@k estimator ([`passk`]).

mod landlock;

pub mod humaneval;
pub mod infill;
pub mod passk;
pub mod sandbox;

pub use humaneval::Problem;
pub use sandbox::{Isolation, Limits, Outcome, Sandbox, SandboxError, Verdict};
