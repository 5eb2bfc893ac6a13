//! The one place that maps weight names between checkpoint layouts, per model family. Each
//! family's transformer mirrors its reference implementation's module tree (BFL's for FLUX,
//! Stability's for SD 3.5), so the published single files and GGUF files load as they are and
//! diffusers-layout folders are renamed (and fused) into those names. The SD family is the other
//! way round: its models mirror diffusers, and [`ldm`] renames the single files into diffusers' names.

pub mod flux;
pub mod ldm;
pub mod sd3;

use candle_core::Tensor;

use crate::error::{EngineError, Result};
use crate::weights::store::{Param, Weights};

/// How a checkpoint names its tensors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// diffusers' names (a `transformer/` folder), renamed on load.
    Diffusers,
    /// The family's reference names (BFL's for FLUX, Stability's for SD 3.5), as published in
    /// single files and GGUF files.
    Reference,
}

/// Rows of an update: `(source rows, target rows)`, each `(start, count)`; `None` is all rows.
pub type RowMap = (Option<(usize, usize)>, Option<(usize, usize)>);

fn dense(w: &mut Weights, name: &str) -> Result<Tensor> {
    match w.take(name) {
        Some(Param::Dense(t)) => Ok(t),
        Some(p) => p.dequantize(&candle_core::Device::Cpu),
        None => Err(EngineError::BadWeights { path: w.origin().to_path_buf(), message: format!("tensor `{name}` is missing") }),
    }
}

/// Renames a tensor if present (optional ones, like FLUX's guidance embedder, may be absent).
fn move_tensor(w: &mut Weights, from: &str, to: String) -> Result<()> {
    if let Some(p) = w.take(from) {
        w.insert(to, p);
    }
    Ok(())
}

/// Concatenates `parts` along the output dimension into one tensor.
fn fuse(w: &mut Weights, parts: &[String], to: String) -> Result<()> {
    let tensors = parts.iter().map(|p| dense(w, p)).collect::<Result<Vec<_>>>()?;
    for (name, t) in parts.iter().zip(&tensors).skip(1) {
        if t.dims().get(1..) != tensors[0].dims().get(1..) {
            return Err(EngineError::BadWeights {
                path: w.origin().to_path_buf(),
                message: format!("tensor `{name}` has shape {:?} but `{}` has {:?}; they must share their input size", t.dims(), parts[0], tensors[0].dims()),
            });
        }
    }
    w.insert(to, Param::Dense(Tensor::cat(&tensors, 0)?));
    Ok(())
}

/// Moves `from` to `to` with its two halves (rows) swapped: diffusers' continuous adaptive
/// norms produce (scale, shift) where the reference implementations produce (shift, scale).
fn swap_halves(w: &mut Weights, from: &str, to: String) -> Result<()> {
    let t = dense(w, from)?;
    let half = t.dim(0)? / 2;
    w.insert(to, Param::Dense(Tensor::cat(&[t.narrow(0, half, half)?, t.narrow(0, 0, half)?], 0)?));
    Ok(())
}
