//! The networks, each mirroring its reference implementation's module tree.

pub mod clip;
pub mod clip_vision;
pub mod ip_adapter;
pub mod unet;
pub mod controlnet;
pub mod attention;
pub mod dit;
pub mod flux;
pub mod flux_controlnet;
pub mod mmdit;
pub mod sdpa;
pub mod vector_math;
pub mod autoencoder_kl;
pub mod autoencoder_tiny;
pub mod conv;
pub mod group_norm;
pub mod linear;
pub mod quant_tiles;
pub mod resnet;
