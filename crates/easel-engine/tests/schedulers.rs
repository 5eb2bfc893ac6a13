//! Timesteps, sigmas and init noise sigma for every scheduler, spacing and a range of step
//! counts, against the values diffusers computes from the same config.

mod common;

use common::reference;
use easel_engine::config::SchedulerConfig;
use easel_engine::SchedulerKind;

fn sd_config(spacing: &str) -> SchedulerConfig {
    serde_json::from_value(serde_json::json!({
        "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
        "num_train_timesteps": 1000, "clip_sample": false, "set_alpha_to_one": false,
        "steps_offset": 1, "timestep_spacing": spacing
    }))
    .unwrap()
}

#[test]
fn schedules_match_diffusers() {
    let (t, _) = reference("scheduler-tables.safetensors");
    let mut checked = 0;
    for spacing in ["leading", "trailing", "linspace"] {
        for (name, kind) in SchedulerKind::ALL.into_iter().filter(|(_, k)| !k.is_flow_matching()) {
            for steps in [1usize, 4, 20, 50] {
                let key = format!("{name}/{spacing}/{steps}");
                let s = kind.build(&sd_config(spacing), steps, 0).unwrap();
                let want_t = t[&format!("{key}/timesteps")].to_vec1::<f64>().unwrap();
                assert_eq!(s.timesteps().len(), want_t.len(), "{key}: timestep count");
                for (a, b) in s.timesteps().iter().zip(&want_t) {
                    assert!((a - b).abs() < 1e-3, "{key}: timesteps {:?} vs {:?}", s.timesteps(), want_t);
                }
                if let (Some(sig), Some(want)) = (s.sigmas(), t.get(&format!("{key}/sigmas"))) {
                    let want = want.to_vec1::<f64>().unwrap();
                    assert_eq!(sig.len(), want.len(), "{key}: sigma count");
                    for (a, b) in sig.iter().zip(&want) {
                        assert!((a - b).abs() <= 1e-5 * b.abs().max(1.0), "{key}: sigmas {sig:?} vs {want:?}");
                    }
                }
                let init = t[&format!("{key}/init_noise_sigma")].to_vec1::<f64>().unwrap()[0];
                assert!((s.init_noise_sigma() - init).abs() <= 1e-5 * init.max(1.0), "{key}: init sigma {} vs {init}", s.init_noise_sigma());
                checked += 1;
            }
        }
    }
    assert_eq!(checked, 72);
}

#[test]
fn unknown_scheduler_names_the_choices() {
    let e = SchedulerKind::parse("plms").unwrap_err().to_string();
    assert!(e.contains("plms") && e.contains("dpmpp-2m-karras"), "{e}");
}
