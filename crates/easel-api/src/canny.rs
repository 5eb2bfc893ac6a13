//! Canny edges, as OpenCV's `cv2.Canny(image, low, high)` computes them (3x3 Sobel, L1
//! gradient), so a photo can drive a canny ControlNet the way diffusers' examples prepare it.
//!
//! Why here: the gateway turns a request's photo into the edge map before the job is queued,
//! so a worker only ever sees a finished control image, and no model code is involved.
//!
//! The steps follow OpenCV's `canny.cpp`: Sobel derivatives with replicated borders; on colour
//! pictures, per pixel, the channel whose `|dx| + |dy|` is largest (the first on ties); non-maximum
//! suppression along the gradient's direction quantised with tan(22.5 deg) in 15-bit fixed
//! point; then hysteresis: pixels above `high` are edges, and pixels above `low` that survived
//! suppression join them when 8-connected to an edge.

/// The edge map of an 8-bit picture with `channels` interleaved channels (1 or 3), row-major:
/// 255 on edges, 0 elsewhere, a byte per pixel. `low` and `high` are OpenCV's `threshold1` and
/// `threshold2` (swapped when given the other way round).
pub fn canny(pixels: &[u8], width: usize, height: usize, channels: usize, low: f64, high: f64) -> Vec<u8> {
    let (low, high) = if low > high { (high, low) } else { (low, high) };
    let (low, high) = (low.floor() as i32, high.floor() as i32);
    let (w, h) = (width, height);
    if w == 0 || h == 0 || pixels.len() != w * h * channels {
        return vec![0; w * h];
    }
    let at = |x: isize, y: isize, c: usize| -> i32 {
        let x = x.clamp(0, w as isize - 1) as usize;
        let y = y.clamp(0, h as isize - 1) as usize;
        pixels[(y * w + x) * channels + c] as i32
    };
    // Gradients and L1 magnitudes, with a zero border of magnitudes around the image.
    let (mw, mh) = (w + 2, h + 2);
    let mut mag = vec![0i32; mw * mh];
    let mut dx = vec![0i32; w * h];
    let mut dy = vec![0i32; w * h];
    for y in 0..h as isize {
        for x in 0..w as isize {
            let mut best = (i32::MIN, 0, 0);
            for c in 0..channels {
                let gx = at(x + 1, y - 1, c) + 2 * at(x + 1, y, c) + at(x + 1, y + 1, c) - at(x - 1, y - 1, c) - 2 * at(x - 1, y, c) - at(x - 1, y + 1, c);
                let gy = at(x - 1, y + 1, c) + 2 * at(x, y + 1, c) + at(x + 1, y + 1, c) - at(x - 1, y - 1, c) - 2 * at(x, y - 1, c) - at(x + 1, y - 1, c);
                let m = gx.abs() + gy.abs();
                if m > best.0 {
                    best = (m, gx, gy);
                }
            }
            let (i, k) = (y as usize * w + x as usize, (y as usize + 1) * mw + x as usize + 1);
            (mag[k], dx[i], dy[i]) = best;
        }
    }
    // 0: may be an edge, 1: is not, 2: is. The map has a border of 1s.
    let mut map = vec![1u8; mw * mh];
    let mut stack = vec![];
    const TG22: i64 = 13573; // tan(22.5 deg) * 2^15, rounded
    for y in 0..h {
        for x in 0..w {
            let k = (y + 1) * mw + x + 1;
            let m = mag[k];
            if m <= low {
                continue;
            }
            let (xs, ys) = (dx[y * w + x], dy[y * w + x]);
            let ax = xs.unsigned_abs() as i64;
            let ay = (ys.unsigned_abs() as i64) << 15;
            let tg22x = ax * TG22;
            let peak = if ay < tg22x {
                m > mag[k - 1] && m >= mag[k + 1]
            } else if ay > tg22x + (ax << 16) {
                m > mag[k - mw] && m >= mag[k + mw]
            } else {
                let s: isize = if (xs ^ ys) < 0 { -1 } else { 1 };
                m > mag[(k as isize - mw as isize - s) as usize] && m > mag[(k as isize + mw as isize + s) as usize]
            };
            if peak {
                if m > high {
                    map[k] = 2;
                    stack.push(k);
                } else {
                    map[k] = 0;
                }
            }
        }
    }
    while let Some(k) = stack.pop() {
        for n in [k - mw - 1, k - mw, k - mw + 1, k - 1, k + 1, k + mw - 1, k + mw, k + mw + 1] {
            if map[n] == 0 {
                map[n] = 2;
                stack.push(n);
            }
        }
    }
    (0..h).flat_map(|y| (0..w).map(move |x| (y, x))).map(|(y, x)| if map[(y + 1) * mw + x + 1] == 2 { 255 } else { 0 }).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_flat_picture_has_no_edges_and_a_step_has_one_line() {
        assert!(canny(&[90; 8 * 6], 8, 6, 1, 100.0, 200.0).iter().all(|&v| v == 0));
        // A vertical step from 0 to 200 between columns 3 and 4: |dx| = 800 on both columns;
        // suppression keeps the left one (strictly above its left neighbour, at least its right).
        let step: Vec<u8> = (0..6).flat_map(|_| (0..8).map(|x| if x < 4 { 0 } else { 200 })).collect();
        let edges = canny(&step, 8, 6, 1, 100.0, 200.0);
        for row in edges.chunks(8) {
            assert_eq!(row, &[0, 0, 0, 255, 0, 0, 0, 0]);
        }
    }

    // The canny preprocessor against OpenCV: `cv2.Canny` on a colour picture (as diffusers'
    // ControlNet examples call it) and on its grey version, at four threshold pairs including a
    // reversed one (tools/fixtures/make_canny_fixtures.py). The edge maps must be identical, pixel
    // for pixel: every step is integer arithmetic, as in OpenCV.
    use std::path::PathBuf;

    fn fixture(name: &str) -> image::DynamicImage {
        let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/canny").join(name);
        image::open(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
    }

    fn check(picture: &str, channels: usize) {
        let img = fixture(&format!("{picture}.png"));
        let (w, h) = (img.width() as usize, img.height() as usize);
        let pixels = if channels == 3 { img.to_rgb8().into_raw() } else { img.to_luma8().into_raw() };
        for (low, high) in [(100, 200), (50, 150), (20, 60), (180, 90)] {
            let want = fixture(&format!("{picture}-{low}-{high}.png")).to_luma8().into_raw();
            let got = canny(&pixels, w, h, channels, low as f64, high as f64);
            let differ = got.iter().zip(&want).filter(|(a, b)| a != b).count();
            let edges = want.iter().filter(|&&v| v > 0).count();
            println!("{picture} {low}/{high}: {edges} edge pixels in OpenCV's, {differ} differ");
            assert_eq!(differ, 0, "{picture} at {low}/{high}: {differ} of {} pixels differ from cv2.Canny", w * h);
        }
    }

    #[test]
    fn canny_on_a_colour_picture_equals_opencv_pixel_for_pixel() {
        check("photo", 3);
    }

    #[test]
    fn canny_on_a_grey_picture_equals_opencv_pixel_for_pixel() {
        check("grey", 1);
    }
}
