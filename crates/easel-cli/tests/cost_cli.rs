//! `easel cost`, the break-even calculator, through the real binary.

use std::process::Command;

fn cost(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_easel")).arg("cost").args(args).output().expect("run easel cost");
    (out.status.success(), String::from_utf8_lossy(&out.stdout).to_string(), String::from_utf8_lossy(&out.stderr).to_string())
}

#[test]
fn prices_both_options_and_finds_break_even() {
    let (ok, out, err) = cost(&["--images-per-day", "20000", "--gpu-hourly-usd", "2.5", "--seconds-per-image", "2", "--provider", "bfl", "--model", "flux-pro-1.1"]);
    assert!(ok, "{err}");
    assert!(out.contains("closed API          $24000.00         $0.04000"), "{out}");
    assert!(out.contains("self-hosted          $1800.00         $0.00300"), "{out}");
    assert!(out.contains("breaks even above 1500 images/day"), "{out}");
}

#[test]
fn the_lessons_figures_come_out_of_the_calculator() {
    // An ops/engineering overhead of ~$25k a month against $0.02 API images: ~50k a day.
    let (ok, out, err) = cost(&["--images-per-day", "50000", "--seconds-per-image", "2", "--api-usd", "0.02", "--overhead-monthly-usd", "25000", "--json"]);
    assert!(ok, "{err}");
    let r: serde_json::Value = serde_json::from_str(&out).expect("json");
    let v = r["break_even_images_per_day"].as_f64().unwrap();
    assert!((40_000.0..60_000.0).contains(&v), "{v}");
    // GPU time per image lands in the lesson's $0.001-0.005 band for 1-4 s images on a $2.5/h GPU.
    let g = r["gpu_usd_per_image"].as_f64().unwrap();
    assert!((0.001..0.005).contains(&g), "{g}");
}

#[test]
fn bad_input_is_one_line() {
    for args in [
        &["--images-per-day=-5", "--seconds-per-image", "2", "--api-usd", "0.02"][..],
        &["--images-per-day", "10", "--api-usd", "0.02"][..],
        &["--images-per-day", "10", "--seconds-per-image", "2", "--provider", "bfl", "--model", "nope"][..],
        &["--images-per-day", "10", "--seconds-per-image", "2", "--api-usd", "0.02", "--utilisation", "1.5"][..],
    ] {
        let (ok, _, err) = cost(args);
        assert!(!ok);
        assert!(err.starts_with("error: ") && err.trim().lines().count() == 1, "{err}");
    }
}
