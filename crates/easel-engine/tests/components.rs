//! Each network on its own against diffusers / transformers: tokenizer ids, text encoders,
//! one UNet evaluation, one VAE decode. A failure here localises a parity failure.

mod common;

use common::{fixtures, reference, rel_l2};
use easel_engine::config::{read_json, ClipTextConfig, UNetConfig, VaeConfig};
use easel_engine::models::autoencoder_kl::AutoencoderKLDecoder;
use easel_engine::models::clip::ClipTextModel;
use easel_engine::models::unet::{AddedCond, UNet2DConditionModel};
use easel_engine::weights::source::component_weights;
use easel_engine::tokenizer::PromptTokenizer;
use easel_engine::weights::load_var_builder;
use easel_engine::{DType, Device, Tensor};

fn vb(pipe: &str, component: &str) -> candle_nn::VarBuilder<'static> {
    let dir = fixtures().join("pipelines").join(pipe);
    load_var_builder(&component_weights(&dir, component, false).unwrap(), DType::F32, &Device::Cpu).unwrap()
}

fn check_text(pipe: &str, te: &str, tok: &str, sfx: &str) {
    let dir = fixtures().join("pipelines").join(pipe);
    let (t, _) = reference(&format!("{pipe}-components.safetensors"));
    let cfg: ClipTextConfig = read_json(&dir.join(te).join("config.json")).unwrap();
    let tokenizer = PromptTokenizer::from_dir(&dir.join(tok), cfg.max_position_embeddings).unwrap();
    let prompt = "a red circle on a blue background, high quality";
    let long = format!("a photo of {}", vec!["a small red circle"; 30].join(" and "));
    for (key, text, cut) in [("prompt", prompt, false), ("long", long.as_str(), true), ("empty", "", false)] {
        let tokens = tokenizer.encode(text).unwrap();
        let want: Vec<u32> = t[&format!("ids{sfx}_{key}")].flatten_all().unwrap().to_vec1::<i64>().unwrap().iter().map(|&x| x as u32).collect();
        assert_eq!(tokens.ids, want, "{pipe}/{tok}: ids for {key}");
        assert_eq!(tokens.truncated, cut, "{pipe}/{tok}: truncation flag for {key}");
    }
    let model = ClipTextModel::new(vb(pipe, te), &cfg).unwrap();
    let ids = Tensor::new(tokenizer.encode(prompt).unwrap().ids.as_slice(), &Device::Cpu).unwrap().unsqueeze(0).unwrap();
    let out = model.forward(&ids).unwrap();
    let e1 = rel_l2(&out.last_hidden_state, &t[&format!("text{sfx}_last_hidden")]);
    let e2 = rel_l2(&out.penultimate, &t[&format!("text{sfx}_penultimate")]);
    assert!(e1 < 1e-5 && e2 < 1e-5, "{pipe}/{te}: last {e1:.2e}, penultimate {e2:.2e}");
    if sfx == "_2" {
        let e3 = rel_l2(&out.pooled, &t["text_2_text_embeds"]);
        assert!(e3 < 1e-5, "{pipe}/{te}: text_embeds {e3:.2e}");
    }
}

#[test]
fn tokenizers_and_text_encoders_match_transformers() {
    check_text("sd15-tiny", "text_encoder", "tokenizer", "");
    check_text("sd21v-tiny", "text_encoder", "tokenizer", "");
    check_text("sdxl-tiny", "text_encoder", "tokenizer", "");
    check_text("sdxl-tiny", "text_encoder_2", "tokenizer_2", "_2");
    check_text("sd15-var-tiny", "text_encoder", "tokenizer", "");
    check_text("sdxl-var-tiny", "text_encoder", "tokenizer", "");
    check_text("sdxl-var-tiny", "text_encoder_2", "tokenizer_2", "_2");
}

#[test]
fn tokenizer_builds_from_vocab_and_merges_when_tokenizer_json_is_absent() {
    let src = fixtures().join("pipelines/sd15-tiny/tokenizer");
    let tmp = tempfile::tempdir().unwrap();
    for f in ["vocab.json", "merges.txt", "tokenizer_config.json"] {
        std::fs::copy(src.join(f), tmp.path().join(f)).unwrap();
    }
    let slow = PromptTokenizer::from_dir(tmp.path(), 77).unwrap();
    let fast = PromptTokenizer::from_dir(&src, 77).unwrap();
    for text in ["a red circle on a blue background, high quality", "Hello   WORLD!! it's 4k", ""] {
        assert_eq!(slow.encode(text).unwrap().ids, fast.encode(text).unwrap().ids, "{text}");
    }
}

fn check_unet_and_vae(pipe: &str) {
    let dir = fixtures().join("pipelines").join(pipe);
    let (t, _) = reference(&format!("{pipe}-components.safetensors"));
    let cfg: UNetConfig = read_json(&dir.join("unet/config.json")).unwrap();
    let unet = UNet2DConditionModel::new(vb(pipe, "unet"), &cfg).unwrap();
    let added = t.get("unet_text_embeds").map(|te| AddedCond { text_embeds: te.clone(), time_ids: t["unet_time_ids"].clone() });
    let ts = t["unet_timestep"].to_vec1::<f32>().unwrap()[0] as f64;
    let out = unet.forward(&t["unet_sample"], ts, &t["unet_context"], added.as_ref(), None).unwrap();
    let e = rel_l2(&out, &t["unet_out"]);
    assert!(e < 1e-5, "{pipe}: unet rel L2 {e:.2e}");

    let vcfg: VaeConfig = read_json(&dir.join("vae/config.json")).unwrap();
    let vae = AutoencoderKLDecoder::new(vb(pipe, "vae"), &vcfg).unwrap();
    let decoded = vae.decode(&t["vae_latents"]).unwrap();
    let e = rel_l2(&decoded, &t["vae_decoded"]);
    assert!(e < 1e-5, "{pipe}: vae rel L2 {e:.2e}");
}

#[test]
fn unet_and_vae_match_diffusers() {
    check_unet_and_vae("sd15-tiny");
    check_unet_and_vae("sd21v-tiny");
    check_unet_and_vae("sdxl-tiny");
    check_unet_and_vae("sd15-var-tiny");
    check_unet_and_vae("sdxl-var-tiny");
}

/// The CPU's fused attention kernel (query blocks, scores, softmax and `P V` per task) against
/// the direct form, reading q, k and v through transposed views as the models pass them, with
/// query counts no block divides, one key, long key rows (small query blocks) and a value
/// width unlike the query's (measured: up to 7.2e-7).
#[test]
fn fused_cpu_attention_equals_direct_attention_within_5e_6() {
    use easel_engine::models::sdpa::{attention, attention_within};
    let dev = Device::Cpu;
    for (b, h, n, m, d, dv) in [(2, 3, 77, 50, 8, 8), (1, 2, 300, 77, 40, 40), (3, 1, 5, 1, 16, 16), (1, 2, 40, 20_000, 8, 8), (2, 2, 33, 19, 12, 20)] {
        // Projections come out as [b, tokens, heads * d]; attention sees [b, heads, tokens, d].
        let heads_view = |tokens: usize, width: usize, scale: f64| {
            let t = (Tensor::randn(0f32, 1.0, (b, tokens, h, width), &dev).unwrap() * scale).unwrap();
            t.transpose(1, 2).unwrap()
        };
        let (q, k, v) = (heads_view(n, d, 2.0), heads_view(m, d, 1.0), heads_view(m, dv, 1.0));
        let scale = (d as f64).powf(-0.5);
        let fused = attention(&q, &k, &v, scale).unwrap();
        let direct = attention_within(&q.contiguous().unwrap(), &k.contiguous().unwrap(), &v, scale, usize::MAX).unwrap();
        assert_eq!(fused.dims(), direct.dims());
        let diff = (fused - &direct).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        println!("[{b},{h},{n},{m},{d}->{dv}]: max abs diff {diff:.2e}");
        assert!(diff < 5e-6, "[{b},{h},{n},{m},{d}->{dv}]: max abs diff {diff:.2e}");
    }
}

/// The tiled, online-softmax form (used beyond the score budget) against the direct form, with
/// budgets that force query blocks only, then key blocks too, on sizes no block divides.
#[test]
fn tiled_attention_equals_direct_attention_within_1e_5() {
    use easel_engine::models::sdpa::attention_within;
    let dev = Device::Cpu;
    for (b, h, n, m, d) in [(2, 3, 77, 50, 8), (1, 2, 130, 301, 16), (2, 1, 64, 77, 40)] {
        let q = (Tensor::randn(0f32, 1.0, (b, h, n, d), &dev).unwrap() * 2.0).unwrap();
        let k = Tensor::randn(0f32, 1.0, (b, h, m, d), &dev).unwrap();
        let v = Tensor::randn(0f32, 1.0, (b, h, m, d), &dev).unwrap();
        let scale = (d as f64).powf(-0.5);
        let direct = attention_within(&q, &k, &v, scale, usize::MAX).unwrap();
        let whole_rows = attention_within(&q, &k, &v, scale, b * h * m * 64).unwrap();
        let key_blocks = attention_within(&q, &k, &v, scale, b * h * 64 * 7).unwrap();
        for (form, out) in [("query blocks", whole_rows), ("query and key blocks", key_blocks)] {
            assert_eq!(out.dims(), direct.dims());
            let diff = (out - &direct).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
            assert!(diff < 1e-5, "[{b},{h},{n},{m},{d}] {form}: max abs diff {diff:.2e}");
        }
    }
}

/// The CPU convolution (per-tap GEMMs over a padded input) against candle's im2col one, for
/// 3x3, 5x5 and 1x1 kernels, non-square inputs, a 1x1 image, and batches of one to four (the
/// batch is one GEMM per tap, through every image's padded rows).
#[test]
fn tap_convolution_equals_candle_convolution_within_1e_5() {
    use candle_nn::{Conv2dConfig, Module, VarBuilder, VarMap};
    use easel_engine::models::conv::conv2d;
    let dev = Device::Cpu;
    for (b, cin, cout, h, w, k) in [(2, 5, 7, 9, 13, 3), (1, 16, 8, 4, 3, 3), (2, 6, 3, 5, 8, 1), (1, 3, 4, 1, 1, 3), (3, 4, 6, 7, 5, 3), (4, 3, 5, 6, 9, 5), (3, 8, 2, 4, 6, 1), (1, 7, 3, 6, 4, 1)] {
        let mut varmap = VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, DType::F32, &dev);
        let cfg = Conv2dConfig { padding: k / 2, ..Default::default() };
        let theirs = candle_nn::conv2d(cin, cout, k, cfg, vb.pp("c")).unwrap();
        let bias = Tensor::randn(0f32, 1.0, cout, &dev).unwrap();
        let theirs = candle_nn::Conv2d::new(theirs.weight().clone(), Some(bias.clone()), cfg);
        varmap.set_one("c.bias", bias).unwrap();
        let ours = conv2d(cin, cout, k, cfg, vb.pp("c")).unwrap();
        let x = Tensor::randn(0f32, 1.0, (b, cin, h, w), &dev).unwrap();
        let (got, want) = (ours.forward(&x).unwrap(), theirs.forward(&x).unwrap());
        assert_eq!(got.dims(), want.dims());
        let diff = (got - &want).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(diff < 1e-5, "[{b},{cin}->{cout},{h}x{w},k{k}] max abs diff {diff:.2e}");
    }
}
