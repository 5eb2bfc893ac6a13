//! The CLI's side of easel-hub: progress bars on stderr, and what `--model`, `--transformer`
//! and hub LoRAs resolve to.

use std::path::PathBuf;
use std::sync::Mutex;

use anyhow::{bail, Context, Result};
use easel_engine::weights::single_file;
use easel_hub::{DownloadProgress, Hub, Resolved};
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};

/// A bar per file and one for the whole download, drawn on stderr (hidden when it is no terminal).
#[derive(Default)]
pub struct DownloadBars {
    bars: MultiProgress,
    total: Mutex<Option<ProgressBar>>,
    file: Mutex<Option<ProgressBar>>,
}

fn style(template: &str) -> ProgressStyle {
    ProgressStyle::with_template(template).unwrap_or_else(|_| ProgressStyle::default_bar())
}

impl DownloadProgress for DownloadBars {
    fn start(&self, files: usize, bytes: u64) {
        let bar = self.bars.add(ProgressBar::new(bytes));
        bar.set_style(style("total {bar:30} {bytes}/{total_bytes} {bytes_per_sec} eta {eta} ({msg})"));
        bar.set_message(format!("{files} files"));
        *self.total.lock().unwrap_or_else(|p| p.into_inner()) = Some(bar);
    }
    fn file(&self, name: &str, size: u64, resumed_from: u64) {
        let bar = self.bars.add(ProgressBar::new(size));
        bar.set_style(style("{msg} {bar:30} {bytes}/{total_bytes} {bytes_per_sec}"));
        bar.set_message(if resumed_from > 0 { format!("{name} (resumed)") } else { name.to_string() });
        bar.set_position(resumed_from);
        *self.file.lock().unwrap_or_else(|p| p.into_inner()) = Some(bar);
    }
    fn bytes(&self, n: u64) {
        for slot in [&self.file, &self.total] {
            if let Some(b) = slot.lock().unwrap_or_else(|p| p.into_inner()).as_ref() {
                b.inc(n);
            }
        }
    }
    fn file_done(&self, _name: &str) {
        if let Some(b) = self.file.lock().unwrap_or_else(|p| p.into_inner()).take() {
            b.finish_and_clear();
        }
    }
    fn finish(&self) {
        if let Some(b) = self.total.lock().unwrap_or_else(|p| p.into_inner()).take() {
            b.finish_and_clear();
        }
    }
}

/// `--model`: a diffusers-layout folder, local or fetched from the hub (with progress bars), or an
/// SD single-file checkpoint (`.safetensors` in LDM names), run through a folder of configs from
/// `config` (`--config`, a folder or hub repo), else from the reference repo of the family its
/// tensors show.
pub fn model_dir(spec: &str, prefer_fp16: bool, config: Option<&str>) -> Result<PathBuf> {
    let hub = Hub::from_env();
    match easel_hub::resolve_model(&hub, spec, prefer_fp16, &DownloadBars::default())? {
        Resolved::Dir(dir) if config.is_some() => {
            bail!("--config is for single-file checkpoints; {} is a diffusers pipeline with its own configs", dir.display())
        }
        Resolved::Dir(dir) => Ok(dir),
        Resolved::File(file) if file.extension().is_some_and(|e| e == "safetensors") => {
            let arch = single_file::inspect(&file)?;
            let config = config.unwrap_or(arch.reference_repo());
            let config_dir = easel_hub::resolve_config(&hub, config, &DownloadBars::default())
                .with_context(|| format!("the configs for {} (--config {config})", file.display()))?;
            Ok(single_file::prepare(&file, &config_dir, &crate::bundled::data_dir().join("single-file"))?)
        }
        Resolved::File(file) => bail!(
            "--model {}: easel runs diffusers folders and SD single-file .safetensors checkpoints; a FLUX or SD 3.5 transformer file (.safetensors or .gguf) goes in --transformer",
            file.display()
        ),
    }
}

/// A single weights file (`--transformer`): a path, or `owner/name/file` on the hub.
pub fn weights_file(spec: &str) -> Result<PathBuf> {
    Ok(easel_hub::resolve_file(&Hub::from_env(), spec, &DownloadBars::default())?)
}

/// A hub LoRA id (`owner/name` or `owner/name/file.safetensors`).
pub fn lora_file(id: &str) -> Result<PathBuf> {
    Ok(easel_hub::resolve_lora(&Hub::from_env(), id)?)
}
