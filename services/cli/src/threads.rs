//! candle asks for its thread count before every CPU matmul, and unless `RAYON_NUM_THREADS` is
//! set it finds the number by reading and parsing `/proc/cpuinfo` each time (candle-core 0.11's
//! `default_num_threads` caches only its CPU-mask lookups): measured here, 3.5–4 ms of a 6.3–6.8
//! ms one-token forward of the shipped model. Setting the variable once, to the value candle
//! would find, turns every later lookup into an environment read.

/// Call first thing in `main`, before any thread exists (setting the environment is not safe
/// while another thread may read it).
pub fn pin_candle_thread_count() {
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        let threads = candle_core::utils::get_num_threads();
        std::env::set_var("RAYON_NUM_THREADS", threads.to_string());
    }
}
