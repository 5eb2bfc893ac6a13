//! A request gets the same image whether it runs alone or batched with others, including
//! with an ancestral scheduler (each request keeps its own seed stream).

mod common;

use common::{fixtures, rel_l2};
use easel_engine::{GenerateParams, LoadOptions, SchedulerKind, StableDiffusionPipeline};

fn params(prompt: &str, seed: u64, batch: usize) -> GenerateParams {
    GenerateParams {
        prompt: prompt.into(),
        negative_prompt: None,
        width: 64,
        height: 64,
        steps: 3,
        guidance: 5.0,
        seed,
        batch,
        scheduler: Some(SchedulerKind::EulerAncestral),
        init_latents: None,
        skip_layer_guidance: None,
        step_cache: None,
        controlnets: Vec::new(),
        ip_adapter: None,
        init_image: None,
    }
}

#[test]
fn batched_requests_match_solo_runs() {
    for name in ["sd15-tiny", "sdxl-tiny"] {
        let pipe = StableDiffusionPipeline::load(&fixtures().join("pipelines").join(name), &LoadOptions::default()).unwrap();
        let reqs = [params("a red circle", 1, 1), params("a blue square on white", 2, 2)];
        let solo: Vec<_> = reqs.iter().map(|p| pipe.generate(p, None, &mut |_| true).unwrap()).collect();
        let batched = pipe.generate_batch(&reqs, None, &mut |_| true).unwrap();
        for (a, b) in solo.iter().zip(&batched) {
            assert_eq!(a.images.len(), b.images.len());
            let e = rel_l2(&b.latents, &a.latents);
            assert!(e < 1e-5, "{name}: batched latents differ from solo by {e:.2e}");
        }
        // A different seed gives a different image.
        let other = pipe.generate(&params("a red circle", 9, 1), None, &mut |_| true).unwrap();
        assert!(rel_l2(&other.latents, &solo[0].latents) > 1e-2);
    }
}
