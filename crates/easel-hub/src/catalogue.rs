//! Models easel knows by name: their hub repo, licence, whether they are gated, and the
//! generation defaults their authors recommend. A hub repo carries no `easel.json`, so without
//! this a distilled model would run 30 steps at guidance 7.5. A model's own `easel.json` still
//! wins over these.

/// One known model.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct KnownModel {
    /// The short name `--model` accepts.
    pub name: &'static str,
    /// The hub repo it resolves to.
    pub repo: &'static str,
    pub licence: &'static str,
    /// Whether the repo asks users to accept its licence (a token is then needed).
    pub gated: bool,
    pub steps: usize,
    pub guidance: f64,
    /// Where the defaults come from.
    pub source: &'static str,
}

/// The catalogue. Step and guidance defaults: the model cards' recommendations, else diffusers'
/// pipeline defaults for that family.
pub const CATALOGUE: &[KnownModel] = &[
    KnownModel { name: "sd15", repo: "stable-diffusion-v1-5/stable-diffusion-v1-5", licence: "creativeml-openrail-m", gated: false, steps: 50, guidance: 7.5, source: "StableDiffusionPipeline defaults, as the model card runs it" },
    KnownModel { name: "sd21", repo: "stabilityai/stable-diffusion-2-1", licence: "openrail++", gated: false, steps: 50, guidance: 7.5, source: "StableDiffusionPipeline defaults, as the model card runs it" },
    KnownModel { name: "sdxl", repo: "stabilityai/stable-diffusion-xl-base-1.0", licence: "openrail++", gated: false, steps: 50, guidance: 5.0, source: "StableDiffusionXLPipeline defaults, as the model card runs it" },
    KnownModel { name: "sdxl-turbo", repo: "stabilityai/sdxl-turbo", licence: "sai-nc-community", gated: false, steps: 1, guidance: 0.0, source: "model card: 1 step, guidance_scale=0.0" },
    KnownModel { name: "flux-dev", repo: "black-forest-labs/FLUX.1-dev", licence: "flux-1-dev-non-commercial-license", gated: true, steps: 28, guidance: 3.5, source: "Black Forest Labs: guidance 3.5; 28 steps as in diffusers' FLUX examples" },
    KnownModel { name: "sd3.5-large", repo: "stabilityai/stable-diffusion-3.5-large", licence: "stabilityai-ai-community", gated: true, steps: 28, guidance: 3.5, source: "model card: num_inference_steps=28, guidance_scale=3.5" },
    KnownModel { name: "sd3.5-large-turbo", repo: "stabilityai/stable-diffusion-3.5-large-turbo", licence: "stabilityai-ai-community", gated: true, steps: 4, guidance: 0.0, source: "model card: 4 steps, guidance_scale=0.0" },
    KnownModel { name: "sd3.5-medium", repo: "stabilityai/stable-diffusion-3.5-medium", licence: "stabilityai-ai-community", gated: true, steps: 40, guidance: 4.5, source: "model card: num_inference_steps=40, guidance_scale=4.5" },
    KnownModel { name: "flux-schnell", repo: "black-forest-labs/FLUX.1-schnell", licence: "apache-2.0", gated: false, steps: 4, guidance: 0.0, source: "model card: 4 steps, guidance_scale=0.0" },
];

/// A known model by short name (`flux-dev`) or repo id, case-insensitively.
pub fn lookup(spec: &str) -> Option<&'static KnownModel> {
    CATALOGUE.iter().find(|m| m.name.eq_ignore_ascii_case(spec) || m.repo.eq_ignore_ascii_case(spec))
}

/// The known model whose hub snapshot `dir` is, if any (whichever client filled the cache).
pub fn for_model_dir(dir: &std::path::Path) -> Option<&'static KnownModel> {
    crate::cache::repo_of_snapshot(dir).and_then(|repo| lookup(&repo))
}

/// The short names, for error messages.
pub fn names() -> String {
    CATALOGUE.iter().map(|m| m.name).collect::<Vec<_>>().join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_names_and_repo_ids_find_the_same_entry() {
        assert_eq!(lookup("flux-dev").map(|m| m.repo), Some("black-forest-labs/FLUX.1-dev"));
        assert_eq!(lookup("black-forest-labs/flux.1-dev").map(|m| m.name), Some("flux-dev"));
        assert_eq!(lookup("sdxl-turbo").map(|m| (m.steps, m.guidance)), Some((1, 0.0)));
        assert!(lookup("nope").is_none());
    }

    #[test]
    fn snapshot_folders_of_known_repos_get_their_defaults() {
        let dir = std::path::Path::new("/x/models--black-forest-labs--FLUX.1-schnell/snapshots/0123456789012345678901234567890123456789");
        assert_eq!(for_model_dir(dir).map(|m| m.steps), Some(4));
    }
}
