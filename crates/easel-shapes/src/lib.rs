//! easel-shapes: what the bundled model was trained on, and a checker for what it draws.
//!
//! The dataset spec (palette, shapes, caption templates, held-out combinations) is the same
//! `tools/bundled/shapes.json` that the Python data generator reads. The checker finds the
//! background colour from the image border, the shape's colour from the pixels that differ
//! from it, and the shape class by overlap with each ideal shape fitted to its bounding box.

use std::collections::BTreeMap;

use serde::Deserialize;

const SPEC_JSON: &str = include_str!("../../../tools/bundled/shapes.json");

/// The dataset definition.
#[derive(Debug, Clone, Deserialize)]
pub struct Spec {
    pub size: u32,
    pub colors: BTreeMap<String, [u8; 3]>,
    pub shapes: Vec<String>,
    pub templates: Vec<String>,
    pub held_out: Vec<[String; 3]>,
}

/// One (shape colour, shape, background colour) combination.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Combo {
    pub color: String,
    pub shape: String,
    pub background: String,
}

impl Spec {
    /// The spec compiled into this crate.
    pub fn bundled() -> Self {
        serde_json::from_str(SPEC_JSON).expect("tools/bundled/shapes.json is valid (checked by tests)")
    }

    /// Every combination with distinct shape and background colours.
    pub fn combos(&self) -> Vec<Combo> {
        let mut v = vec![];
        for c in self.colors.keys() {
            for s in &self.shapes {
                for b in self.colors.keys().filter(|b| *b != c) {
                    v.push(Combo { color: c.clone(), shape: s.clone(), background: b.clone() });
                }
            }
        }
        v
    }

    /// Whether a combination was kept out of training.
    pub fn is_held_out(&self, c: &Combo) -> bool {
        self.held_out.iter().any(|[col, s, b]| *col == c.color && *s == c.shape && *b == c.background)
    }

    /// The canonical prompt for a combination (the first caption template).
    pub fn prompt(&self, c: &Combo) -> String {
        let article = if c.color.starts_with(['a', 'e', 'i', 'o', 'u']) { "an" } else { "a" };
        self.templates[0]
            .replace("{a}", article)
            .replace("{color}", &c.color)
            .replace("{shape}", &c.shape)
            .replace("{background}", &c.background)
    }

    fn nearest(&self, rgb: [f32; 3]) -> String {
        self.colors
            .iter()
            .min_by(|a, b| dist(rgb, a.1).total_cmp(&dist(rgb, b.1)))
            .map(|(n, _)| n.clone())
            .unwrap_or_default()
    }

    /// Grades one image.
    pub fn classify(&self, img: &image::RgbImage) -> Classification {
        let (w, h) = img.dimensions();
        let px = |x: u32, y: u32| {
            let p = img.get_pixel(x, y).0;
            [p[0] as f32, p[1] as f32, p[2] as f32]
        };
        let border: Vec<[f32; 3]> =
            (0..w).flat_map(|x| (0..h).map(move |y| (x, y))).filter(|&(x, y)| x < 3 || y < 3 || x >= w - 3 || y >= h - 3).map(|(x, y)| px(x, y)).collect();
        let bg = median(&border);
        let background = self.nearest(bg);
        let bg_ref = self.colors[&background].map(|v| v as f32);
        let mut mask = vec![false; (w * h) as usize];
        let mut fg = vec![];
        for y in 0..h {
            for x in 0..w {
                if dist(px(x, y), &bg_ref.map(|v| v as u8)) > 80.0 && dist(px(x, y), &bg.map(|v| v as u8)) > 80.0 {
                    mask[(y * w + x) as usize] = true;
                    fg.push(px(x, y));
                }
            }
        }
        if fg.len() < 30 {
            return Classification { background, color: None, shape: None };
        }
        let color = self.nearest(median(&fg));
        let shape = self.shape_of(&mask, w, h);
        Classification { background, color: Some(color), shape }
    }

    fn shape_of(&self, mask: &[bool], w: u32, h: u32) -> Option<String> {
        // The bounding box of the mask, ignoring specks (pixels with fewer than 2 set neighbours).
        let at = |x: i64, y: i64| x >= 0 && y >= 0 && x < w as i64 && y < h as i64 && mask[(y as u32 * w + x as u32) as usize];
        let solid = |x: u32, y: u32| {
            let (x, y) = (x as i64, y as i64);
            at(x, y) && (-1..=1).flat_map(|dy| (-1..=1).map(move |dx| (dx, dy))).filter(|&(dx, dy)| (dx, dy) != (0, 0) && at(x + dx, y + dy)).count() >= 2
        };
        let on: Vec<(f32, f32)> = (0..h).flat_map(|y| (0..w).map(move |x| (x, y))).filter(|&(x, y)| solid(x, y)).map(|(x, y)| (x as f32, y as f32)).collect();
        if on.is_empty() {
            return None;
        }
        let fold = |f: fn(f32, f32) -> f32, init: f32, sel: fn(&(f32, f32)) -> f32| on.iter().map(sel).fold(init, f);
        let (x0, x1) = (fold(f32::min, f32::MAX, |p| p.0), fold(f32::max, f32::MIN, |p| p.0) + 1.0);
        let (y0, y1) = (fold(f32::min, f32::MAX, |p| p.1), fold(f32::max, f32::MIN, |p| p.1) + 1.0);
        let (cx, cy, rx, ry) = ((x0 + x1) / 2.0, (y0 + y1) / 2.0, (x1 - x0) / 2.0, (y1 - y0) / 2.0);
        if rx < 2.0 || ry < 2.0 {
            return None;
        }
        let inside = |shape: &str, x: f32, y: f32| -> bool {
            let (u, v) = ((x - cx) / rx, (y - cy) / ry);
            match shape {
                "circle" => u * u + v * v <= 1.0,
                "square" => u.abs() <= 1.0 && v.abs() <= 1.0,
                "diamond" => u.abs() + v.abs() <= 1.0,
                // apex at the top, base at the bottom
                "triangle" => (-1.0..=1.0).contains(&v) && u.abs() <= (v + 1.0) / 2.0,
                _ => false,
            }
        };
        let margin = 3;
        let (bx0, bx1) = ((x0 as i64 - margin).max(0) as u32, ((x1 as i64 + margin) as u32).min(w - 1));
        let (by0, by1) = ((y0 as i64 - margin).max(0) as u32, ((y1 as i64 + margin) as u32).min(h - 1));
        self.shapes
            .iter()
            .map(|s| {
                let (mut inter, mut union) = (0u32, 0u32);
                for y in by0..=by1 {
                    for x in bx0..=bx1 {
                        let a = mask[(y * w + x) as usize];
                        let b = inside(s, x as f32 + 0.5, y as f32 + 0.5);
                        inter += (a && b) as u32;
                        union += (a || b) as u32;
                    }
                }
                (s.clone(), inter as f32 / union.max(1) as f32)
            })
            .max_by(|a, b| a.1.total_cmp(&b.1))
            .map(|(s, _)| s)
    }
}

/// What the checker sees in an image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Classification {
    pub background: String,
    pub color: Option<String>,
    pub shape: Option<String>,
}

impl Classification {
    /// (background right, shape colour right, shape class right).
    pub fn grade(&self, want: &Combo) -> (bool, bool, bool) {
        (
            self.background == want.background,
            self.color.as_deref() == Some(want.color.as_str()),
            self.shape.as_deref() == Some(want.shape.as_str()),
        )
    }
}

fn dist(a: [f32; 3], b: &[u8; 3]) -> f32 {
    a.iter().zip(b).map(|(x, y)| (x - *y as f32).powi(2)).sum::<f32>().sqrt()
}

fn median(px: &[[f32; 3]]) -> [f32; 3] {
    let mut out = [0.0; 3];
    for (c, o) in out.iter_mut().enumerate() {
        let mut v: Vec<f32> = px.iter().map(|p| p[c]).collect();
        v.sort_by(f32::total_cmp);
        *o = v[v.len() / 2];
    }
    out
}

/// Renders a combination the way the dataset generator does (for testing the checker).
pub fn render(spec: &Spec, c: &Combo, cx: f32, cy: f32, r: f32) -> image::RgbImage {
    let col = spec.colors[&c.color];
    let bg = spec.colors[&c.background];
    image::RgbImage::from_fn(spec.size, spec.size, |x, y| {
        let (u, v) = ((x as f32 + 0.5 - cx) / r, (y as f32 + 0.5 - cy) / r);
        let inside = match c.shape.as_str() {
            "circle" => u * u + v * v <= 1.0,
            "square" => u.abs() <= 1.0 && v.abs() <= 1.0,
            "diamond" => u.abs() + v.abs() <= 1.0,
            "triangle" => (-1.0..=1.0).contains(&v) && u.abs() <= (v + 1.0) / 2.0,
            _ => false,
        };
        image::Rgb(if inside { col } else { bg })
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    #[test]
    fn spec_parses_and_has_what_the_issue_asks() {
        let s = Spec::bundled();
        assert!(s.colors.len() >= 8 && s.shapes.len() >= 4);
        assert!(s.held_out.iter().all(|h| s.colors.contains_key(&h[0]) && s.shapes.contains(&h[1]) && s.colors.contains_key(&h[2])));
        let c = Combo { color: "orange".into(), shape: "circle".into(), background: "blue".into() };
        assert_eq!(s.prompt(&c), "an orange circle on a blue background");
    }

    #[test]
    fn checker_grades_clean_renders_perfectly() {
        let s = Spec::bundled();
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        for c in s.combos() {
            let r = rng.random_range(10.0..20.0);
            let (cx, cy) = (rng.random_range(r + 2.0..64.0 - r - 3.0), rng.random_range(r + 2.0..64.0 - r - 3.0));
            let got = s.classify(&render(&s, &c, cx, cy, r));
            assert_eq!(got.grade(&c), (true, true, true), "{c:?} -> {got:?}");
        }
    }
}
