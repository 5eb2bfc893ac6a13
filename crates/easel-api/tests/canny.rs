//! The canny preprocessor against OpenCV: `cv2.Canny` on a colour picture (as diffusers'
//! ControlNet examples call it) and on its grey version, at four threshold pairs including a
//! reversed one (tools/fixtures/make_canny_fixtures.py). The edge maps must be identical, pixel
//! for pixel: every step is integer arithmetic, as in OpenCV.

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
        let got = easel_api::canny::canny(&pixels, w, h, channels, low as f64, high as f64);
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
