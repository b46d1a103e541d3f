//! Shared helpers of the trainer's tests.

use sdlm_trainer::Settings;

/// The smoke preset shrunk further, for tests that train in debug builds.
pub fn tiny_settings() -> Settings {
    let mut s = Settings::preset("smoke").unwrap();
    s.vocab_size = 64;
    s.architecture.hidden_size = 32;
    s.architecture.intermediate_size = 64;
    s.architecture.head_dim = 8;
    s
}
