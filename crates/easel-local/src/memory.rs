//! How much memory a request needs, so the gateway refuses what no worker can hold (a 400
//! naming `size` or `n`) instead of queueing a job that aborts the worker that takes it.

use easel_api::MemoryEstimate;
use easel_engine::Pipeline;

/// 90% of physical memory (Linux's MemTotal), or no limit where it cannot be read. Host memory
/// only: on a GPU the device's own memory is the tighter bound (`easel models memory --vram`).
pub fn default_request_memory() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|info| info.lines().find_map(|l| l.strip_prefix("MemTotal:").and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())))
        .map(|kib| kib * 1024 / 10 * 9)
        .unwrap_or(u64::MAX)
}

/// What one request for `pipe` needs: its weights plus the engine's activation estimate.
pub fn memory_estimate(pipe: &Pipeline, weight_bytes: u64, budget_bytes: u64) -> MemoryEstimate {
    let activations = pipe.activation_memory();
    MemoryEstimate {
        denoise_bytes_per_pixel: activations.denoise_bytes_per_pixel,
        decode_bytes_per_pixel: activations.decode_bytes_per_pixel,
        fixed_bytes: weight_bytes + activations.fixed_bytes,
        budget_bytes,
    }
}

/// Bytes of every file under `dir` (a model's weights, for the warm pool's budget).
pub fn dir_bytes(dir: &std::path::Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|rd| rd.filter_map(|e| e.ok()).map(|e| if e.path().is_dir() { dir_bytes(&e.path()) } else { e.metadata().map(|m| m.len()).unwrap_or(0) }).sum())
        .unwrap_or(0)
}
