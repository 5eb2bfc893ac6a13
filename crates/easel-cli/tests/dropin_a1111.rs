//! A1111 WebUI clients against `easel serve`: the requests Open WebUI and SillyTavern send,
//! in their order and with their bodies and headers, as their sources build them:
//! - Open WebUI: `open-webui/open-webui` `backend/open_webui/routers/images.py` at
//!   02530d501461ce58ab06231d7c2ef2024a141ddf (`get_automatic1111_api_auth`, `get_image_model`,
//!   `set_image_model`, `get_models`, `image_generations`);
//! - SillyTavern: `SillyTavern/SillyTavern` `src/endpoints/stable-diffusion.js` at
//!   02903fdd3ad33dc642fb328e43d0a8b3724e1a38 (the `/api/sd/*` proxy routes) and
//!   `public/scripts/extensions/stable-diffusion/index.js` (`generateAutoImage`, release branch
//!   of 2024-09-28).

use std::time::{Duration, Instant};

use base64::Engine as _;
use serde_json::{json, Value};

mod common;
use common::*;

fn basic(credentials: &str) -> String {
    format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(credentials))
}

fn call(s: &Server, method: &str, path: &str, auth: &str, body: Option<Value>) -> (u16, Value) {
    let c = client();
    let url = format!("{}{path}", s.base);
    let rb = match method {
        "GET" => c.get(url),
        _ => c.post(url),
    };
    let rb = rb.header("authorization", auth);
    let rb = match body {
        Some(b) => rb.json(&b),
        None => rb,
    };
    let r = rb.send().unwrap();
    let status = r.status().as_u16();
    (status, r.json().unwrap_or(Value::Null))
}

fn decode_png(b64: &str) -> Vec<u8> {
    base64::engine::general_purpose::STANDARD.decode(b64).unwrap()
}

#[test]
fn open_webui_lists_sets_the_model_and_generates_as_its_automatic1111_engine_does() {
    let tmp = tempfile::tempdir().unwrap();
    let s = serve(tmp.path(), &["--api-key", "webui:s3cret"]);
    // AUTOMATIC1111_API_AUTH = "user:pass" -> `authorization: Basic b64(user:pass)`.
    let auth = basic("admin:s3cret");
    // Verifying the URL, and get_image_model: GET /sdapi/v1/options, options['sd_model_checkpoint'].
    let (st, options) = call(&s, "GET", "/sdapi/v1/options", &auth, None);
    assert_eq!(st, 200, "{options}");
    assert_eq!(options["sd_model_checkpoint"], "tiny");
    // get_models: [{'id': m['title'], 'name': m['model_name']} for m in GET /sdapi/v1/sd-models].
    let (_, models) = call(&s, "GET", "/sdapi/v1/sd-models", &auth, None);
    assert_eq!((models[0]["title"].as_str(), models[0]["model_name"].as_str()), (Some("tiny"), Some("tiny")));
    // set_image_model: the options it just read, with sd_model_checkpoint changed, POSTed whole.
    let mut all = options.clone();
    all["sd_model_checkpoint"] = models[0]["title"].clone();
    assert_eq!(call(&s, "POST", "/sdapi/v1/options", &auth, Some(all)).0, 200);
    // image_generations: {prompt, batch_size, width, height, steps, negative_prompt, **AUTOMATIC1111_PARAMS}.
    let body = json!({"prompt": "a red circle", "batch_size": 2, "width": 64, "height": 64, "steps": 2, "negative_prompt": "blurry",
                      "cfg_scale": 7, "sampler_name": "DPM++ 2M", "scheduler": "Karras"});
    let (st, res) = call(&s, "POST", "/sdapi/v1/txt2img", &auth, Some(body));
    assert_eq!(st, 200, "{res}");
    let images = res["images"].as_array().unwrap();
    assert_eq!(images.len(), 2);
    for img in images {
        assert_eq!(&decode_png(img.as_str().unwrap())[..8], b"\x89PNG\r\n\x1a\n", "raw base64 PNG, no data: prefix");
    }
    // res['info'] must be there (it is copied into the file's metadata); it is a JSON string.
    let info: Value = serde_json::from_str(res["info"].as_str().unwrap()).unwrap();
    assert_eq!((info["sampler_name"].as_str(), info["steps"].as_u64(), info["all_seeds"].as_array().map(Vec::len)), (Some("DPM++ 2M"), Some(2), Some(2)));
    assert_eq!(info["easel"]["model"], "tiny");
    assert_eq!(res["parameters"]["batch_size"], 2, "parameters echo the request");
    // A wrong password is a 401.
    assert_eq!(call(&s, "GET", "/sdapi/v1/options", &basic("admin:wrong"), None).0, 401);
}

#[test]
fn sillytavern_pings_lists_switches_models_generates_and_interrupts_as_its_sd_proxy_does() {
    let tmp = tempfile::tempdir().unwrap();
    // No --api-auth configured in SillyTavern: it still sends `Authorization: Basic ` + b64("").
    let s = serve(tmp.path(), &[]);
    let auth = basic("");
    // /api/sd/ping, /upscalers (Promise.all with latent-upscale-modes), /vaes (sd-vae and sd-modules), /samplers, /schedulers, /models.
    for path in ["/sdapi/v1/options", "/sdapi/v1/upscalers", "/sdapi/v1/latent-upscale-modes", "/sdapi/v1/sd-vae", "/sdapi/v1/sd-modules"] {
        assert_eq!(call(&s, "GET", path, &auth, None).0, 200, "{path}");
    }
    let (_, samplers) = call(&s, "GET", "/sdapi/v1/samplers", &auth, None);
    let names: Vec<&str> = samplers.as_array().unwrap().iter().map(|x| x["name"].as_str().unwrap()).collect();
    assert!(names.contains(&"Euler a") && names.contains(&"DPM++ 2M"), "{samplers}");
    let (_, schedulers) = call(&s, "GET", "/sdapi/v1/schedulers", &auth, None);
    assert_eq!(schedulers[1]["name"], "karras");
    let (_, models) = call(&s, "GET", "/sdapi/v1/sd-models", &auth, None);
    let model = models[0]["title"].as_str().unwrap().to_string();
    // /set-model: POST {"sd_model_checkpoint"} alone, then GET /progress until progress 0 and job_count 0.
    assert_eq!(call(&s, "POST", "/sdapi/v1/options", &auth, Some(json!({"sd_model_checkpoint": model}))).0, 200);
    let (_, progress) = call(&s, "GET", "/sdapi/v1/progress", &auth, None);
    assert_eq!((progress["progress"].as_f64(), progress["state"]["job_count"].as_u64()), (Some(0.0), Some(0)), "{progress}");
    // An unknown model is refused, naming the option.
    let (st, err) = call(&s, "POST", "/sdapi/v1/options", &auth, Some(json!({"sd_model_checkpoint": "nope.safetensors [abc]"})));
    assert_eq!((st, err["error"]["param"].as_str()), (400, Some("sd_model_checkpoint")), "{err}");
    // generateAutoImage's body, forwarded whole by the server (url and auth included).
    let body = |steps: u32| {
        json!({
            "url": "http://127.0.0.1:7860", "auth": "",
            "prompt": "a green triangle", "negative_prompt": "lowres",
            "sampler_name": "Euler a", "scheduler": "Automatic", "steps": steps, "cfg_scale": 7, "width": 64, "height": 64,
            "restore_faces": false, "enable_hr": false, "hr_upscaler": "Latent", "hr_scale": 2.0, "denoising_strength": 0.7, "hr_second_pass_steps": 0,
            "override_settings": {"CLIP_stop_at_last_layers": 1}, "override_settings_restore_afterwards": true,
            "clip_skip": 1, "save_images": true, "send_images": true, "do_not_save_grid": false, "do_not_save_samples": false,
        })
    };
    let (st, res) = call(&s, "POST", "/sdapi/v1/txt2img", &auth, Some(body(2)));
    assert_eq!(st, 200, "{res}");
    assert_eq!(&decode_png(res["images"][0].as_str().unwrap())[..4], b"\x89PNG", "data.images[0] is a PNG");
    // A long generation shows in /progress, and /interrupt (sent when the browser goes away) stops it.
    let base = s.base.clone();
    let long = std::thread::spawn(move || {
        let r = client().post(format!("{base}/sdapi/v1/txt2img")).header("authorization", basic("")).json(&body(200)).send().unwrap();
        (r.status().as_u16(), r.json::<Value>().unwrap())
    });
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (_, p) = call(&s, "GET", "/sdapi/v1/progress", &auth, None);
        if p["state"]["sampling_step"].as_u64().unwrap_or(0) > 0 && p["current_image"].is_string() {
            assert!(p["progress"].as_f64().unwrap() > 0.0 && p["state"]["job_count"] == 1, "{p}");
            assert_eq!(&decode_png(p["current_image"].as_str().unwrap())[..4], b"\x89PNG", "the step preview, base64 PNG");
            break;
        }
        assert!(Instant::now() < deadline, "no progress: {p}");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(call(&s, "POST", "/sdapi/v1/interrupt", &auth, None).0, 200);
    let (st, res) = long.join().unwrap();
    assert_eq!(st, 200, "{res}");
    assert_eq!(res["images"], json!([]));
    let info: Value = serde_json::from_str(res["info"].as_str().unwrap()).unwrap();
    assert_eq!(info["interrupted"], true);
    // Samplers easel lacks are a 400 naming sampler_name, as the WebUI's "Sampler not found".
    let mut bad = body(2);
    bad["sampler_name"] = json!("DPM++ SDE");
    let (st, err) = call(&s, "POST", "/sdapi/v1/txt2img", &auth, Some(bad));
    assert_eq!((st, err["error"]["param"].as_str()), (400, Some("sampler_name")), "{err}");
}

fn png_b64(width: u32, height: u32, pixel: impl Fn(u32, u32) -> [u8; 3]) -> String {
    let img = image::RgbImage::from_fn(width, height, |x, y| image::Rgb(pixel(x, y)));
    let mut out = std::io::Cursor::new(Vec::new());
    img.write_to(&mut out, image::ImageFormat::Png).unwrap();
    base64::engine::general_purpose::STANDARD.encode(out.into_inner())
}

/// `/sdapi/v1/img2img` as A1111's API takes it: `init_images`, `denoising_strength`, and for
/// inpainting `mask` with `inpainting_mask_invert`; the result is A1111's answer, the picture's
/// size kept when no size is asked, and bad input a 400 naming the field.
#[test]
fn a1111_img2img_and_inpainting_take_init_images_strength_and_masks() {
    let tmp = tempfile::tempdir().unwrap();
    let s = serve(tmp.path(), &[]);
    let auth = basic("");
    let picture = png_b64(48, 32, |x, y| [(x * 5) as u8, 90, (y * 7) as u8]);
    let body = json!({"prompt": "a watercolour", "init_images": [picture], "denoising_strength": 0.5, "steps": 4, "seed": 9, "sampler_name": "Euler"});
    let (st, res) = call(&s, "POST", "/sdapi/v1/img2img", &auth, Some(body));
    assert_eq!(st, 200, "{res}");
    let png = decode_png(res["images"][0].as_str().unwrap());
    assert_eq!(image::load_from_memory(&png).unwrap().to_rgb8().dimensions(), (48, 32), "the picture's size");
    let info: Value = serde_json::from_str(res["info"].as_str().unwrap()).unwrap();
    assert_eq!((info["width"].as_u64(), info["seed"].as_u64()), (Some(48), Some(9)));
    // Inpainting, with the mask inverted (black repaints): answered like any request.
    let mask = png_b64(48, 32, |x, _| if x < 24 { [255; 3] } else { [0; 3] });
    let body = json!({"prompt": "x", "init_images": [picture], "mask": mask, "inpainting_mask_invert": 1, "steps": 3, "width": 64, "height": 64});
    let (st, res) = call(&s, "POST", "/sdapi/v1/img2img", &auth, Some(body));
    assert_eq!(st, 200, "{res}");
    let png = decode_png(res["images"][0].as_str().unwrap());
    assert_eq!(image::load_from_memory(&png).unwrap().to_rgb8().dimensions(), (64, 64), "width and height resize it");
    for (body, param) in [
        (json!({"prompt": "x", "steps": 3}), "init_images"),
        (json!({"prompt": "x", "init_images": ["%%%"]}), "image"),
        (json!({"prompt": "x", "init_images": [picture], "denoising_strength": 2.0}), "strength"),
    ] {
        let (st, err) = call(&s, "POST", "/sdapi/v1/img2img", &auth, Some(body.clone()));
        assert_eq!((st, err["error"]["param"].as_str()), (400, Some(param)), "{body}: {err}");
    }
}
