//! Aspect-ratio buckets (kohya's `BucketManager` semantics): the grid of
//! bucket resolutions, the bucket of each image, the size it is resized to
//! before cropping, and the crop window.
//!
//! Must not: decode images or know about captions; pure arithmetic on sizes.

use serde::Serialize;

use super::config::BucketSpec;
use crate::model::seeded::SeededRng;

/// One bucket: every image in it is trained at exactly `width × height`.
/// Ordered by (width, height) like kohya's sorted bucket list.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub(crate) struct Bucket {
    pub width: u32,
    pub height: u32,
}

impl Bucket {
    pub(crate) fn new(width: u32, height: u32) -> Self {
        Self { width, height }
    }

    pub(crate) fn aspect(&self) -> f64 {
        self.width as f64 / self.height as f64
    }
}

/// Where one image goes: its bucket, and the size it is resized to (covering
/// the bucket) before the crop to the bucket.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub(crate) struct Placement {
    pub bucket: Bucket,
    /// `(width, height)` after the resize; both ≥ the bucket's sides.
    pub resized: (u32, u32),
}

impl Placement {
    /// `bucket aspect − image aspect` (kohya's `ar_error`).
    pub(crate) fn aspect_error(&self, image: (u32, u32)) -> f64 {
        self.bucket.aspect() - image.0 as f64 / image.1 as f64
    }
}

/// The bucket resolutions a dataset may use.
#[derive(Clone, Debug, PartialEq)]
pub(crate) enum BucketGrid {
    /// A fixed list (sorted): kohya's predefined buckets, or the single
    /// `resolution` bucket when bucketing is off.
    Fixed(Vec<Bucket>),
    /// `bucket_no_upscale`: each image gets a bucket computed from its own size.
    NoUpscale { max_area: u64, steps: u32 },
}

impl BucketGrid {
    pub(crate) fn new(spec: &BucketSpec) -> Self {
        let res = spec.resolution;
        if !spec.enabled {
            BucketGrid::Fixed(vec![Bucket::new(res.width, res.height)])
        } else if spec.no_upscale {
            BucketGrid::NoUpscale {
                max_area: res.area(),
                steps: spec.steps,
            }
        } else {
            BucketGrid::Fixed(make_bucket_resolutions(
                res.area(),
                spec.min_reso,
                spec.max_reso,
                spec.steps,
            ))
        }
    }

    /// The bucket and resize of a `width × height` image; `None` when the
    /// image is too small for any bucket (only with `bucket_no_upscale`).
    pub(crate) fn place(&self, width: u32, height: u32) -> Option<Placement> {
        if width == 0 || height == 0 {
            return None;
        }
        match self {
            BucketGrid::Fixed(buckets) => {
                let exact = Bucket::new(width, height);
                let bucket = if buckets.contains(&exact) {
                    exact
                } else {
                    nearest_aspect(buckets, width as f64 / height as f64)?
                };
                Some(Placement {
                    bucket,
                    resized: cover_size((width, height), bucket),
                })
            }
            BucketGrid::NoUpscale { max_area, steps } => {
                place_no_upscale(width, height, *max_area, *steps)
            }
        }
    }
}

/// kohya's `make_bucket_resolutions`: the square bucket of area ≤ `max_area`,
/// then for each width from `min_reso` to `max_reso` in `steps` the tallest
/// height (a multiple of `steps`, ≤ `max_reso`) keeping the area ≤ `max_area`,
/// with its transpose. Sorted by (width, height), without duplicates.
pub(crate) fn make_bucket_resolutions(
    max_area: u64,
    min_reso: u32,
    max_reso: u32,
    steps: u32,
) -> Vec<Bucket> {
    let steps64 = steps.max(1) as u64;
    let mut out = Vec::new();
    let side = ((max_area as f64).sqrt() as u64 / steps64 * steps64) as u32;
    if side > 0 {
        out.push(Bucket::new(side, side));
    }
    let mut width = min_reso.max(steps);
    while width <= max_reso {
        let height = (max_area / width as u64 / steps64 * steps64).min(max_reso as u64) as u32;
        if height >= min_reso && height > 0 {
            out.push(Bucket::new(width, height));
            out.push(Bucket::new(height, width));
        }
        width += steps;
    }
    out.sort();
    out.dedup();
    out
}

/// kohya's `round_to_steps`: round to the nearest integer, then down to a
/// multiple of `steps`.
pub(crate) fn round_to_steps(x: f64, steps: u32) -> u32 {
    let x = (x + 0.5).max(0.0) as u32;
    x - x % steps.max(1)
}

/// The first bucket with the smallest |aspect − `aspect`| (numpy `argmin`).
fn nearest_aspect(buckets: &[Bucket], aspect: f64) -> Option<Bucket> {
    let mut best: Option<(f64, Bucket)> = None;
    for &b in buckets {
        let err = (b.aspect() - aspect).abs();
        if best.is_none_or(|(e, _)| err < e) {
            best = Some((err, b));
        }
    }
    best.map(|(_, b)| b)
}

/// The size that covers `bucket` with the image's aspect ratio: the side
/// along which the bucket is relatively longer matches exactly.
pub(crate) fn cover_size(image: (u32, u32), bucket: Bucket) -> (u32, u32) {
    let (w, h) = (image.0 as f64, image.1 as f64);
    let scale = if w / h > bucket.aspect() {
        bucket.height as f64 / h
    } else {
        bucket.width as f64 / w
    };
    let rw = ((w * scale + 0.5) as u32).max(bucket.width);
    let rh = ((h * scale + 0.5) as u32).max(bucket.height);
    (rw, rh)
}

fn place_no_upscale(width: u32, height: u32, max_area: u64, steps: u32) -> Option<Placement> {
    let aspect = width as f64 / height as f64;
    let resized = if width as u64 * height as u64 > max_area {
        // Shrink to max_area keeping the aspect, then make one side a multiple
        // of `steps`: whichever of the two choices keeps the aspect better.
        let rw = (max_area as f64 * aspect).sqrt();
        let rh = max_area as f64 / rw;
        let w_rounded = round_to_steps(rw, steps);
        let h_in_w = round_to_steps(w_rounded as f64 / aspect, steps);
        let ar_w = w_rounded as f64 / h_in_w as f64;
        let h_rounded = round_to_steps(rh, steps);
        let w_in_h = round_to_steps(h_rounded as f64 * aspect, steps);
        let ar_h = w_in_h as f64 / h_rounded as f64;
        if (ar_w - aspect).abs() < (ar_h - aspect).abs() {
            (w_rounded, (w_rounded as f64 / aspect + 0.5) as u32)
        } else {
            ((h_rounded as f64 * aspect + 0.5) as u32, h_rounded)
        }
    } else {
        (width, height)
    };
    let bucket = Bucket::new(resized.0 - resized.0 % steps, resized.1 - resized.1 % steps);
    if bucket.width == 0 || bucket.height == 0 {
        return None;
    }
    Some(Placement { bucket, resized })
}

/// Top-left corner of the crop of a `resized` image to `bucket`: centred
/// (kohya's `trim // 2`), or uniform in `0..=trim` per axis when `rng` is given.
pub(crate) fn crop_offset(
    resized: (u32, u32),
    bucket: Bucket,
    rng: Option<&mut SeededRng>,
) -> (u32, u32) {
    let trim_w = resized.0.saturating_sub(bucket.width);
    let trim_h = resized.1.saturating_sub(bucket.height);
    match rng {
        None => (trim_w / 2, trim_h / 2),
        Some(rng) => {
            let mut pick = |trim: u32| {
                if trim == 0 {
                    0
                } else {
                    below(rng, trim as u64 + 1) as u32
                }
            };
            let left = pick(trim_w);
            let top = pick(trim_h);
            (left, top)
        }
    }
}

/// Uniform integer in `0..n` (`n > 0`), without modulo bias worth mentioning.
pub(crate) fn below(rng: &mut SeededRng, n: u64) -> u64 {
    ((rng.next_u64() as u128 * n as u128) >> 64) as u64
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::train::dataset::config::{DatasetConfig, FolderConfig, Resolution};

    fn grid(res: u32, no_upscale: bool) -> BucketGrid {
        let cfg = DatasetConfig {
            folders: vec![FolderConfig::new("x")],
            resolution: Resolution::square(res),
            bucket_no_upscale: no_upscale,
            ..Default::default()
        };
        BucketGrid::new(&cfg.bucket_spec().expect("valid"))
    }

    #[test]
    fn buckets_are_stepped_multiples_of_16_and_within_area() {
        for (res, steps) in [(512u32, 64u32), (1024, 64), (768, 32), (512, 16)] {
            let area = res as u64 * res as u64;
            let b = make_bucket_resolutions(area, 256, 2048, steps);
            assert!(b.contains(&Bucket::new(res, res)), "{res}: {b:?}");
            for x in &b {
                assert_eq!(x.width % steps, 0);
                assert_eq!(x.height % steps, 0);
                assert_eq!(x.width % 16, 0);
                assert_eq!(x.height % 16, 0);
                assert!(x.width as u64 * x.height as u64 <= area, "{x:?}");
                assert!(x.width >= 256 && x.height >= 256 && x.width <= 2048 && x.height <= 2048);
            }
            let mut sorted = b.clone();
            sorted.sort();
            assert_eq!(sorted, b);
        }
    }

    #[test]
    fn known_grid_for_512() {
        // kohya: 512² area, min 256, max 1024, step 64.
        let b = make_bucket_resolutions(512 * 512, 256, 1024, 64);
        let expect = [
            (256, 832),
            (256, 896),
            (256, 960),
            (256, 1024),
            (320, 704),
            (320, 768),
            (384, 640),
            (448, 576),
            (512, 512),
            (576, 448),
            (640, 384),
            (704, 320),
            (768, 320),
            (832, 256),
            (896, 256),
            (960, 256),
            (1024, 256),
        ];
        let got: Vec<(u32, u32)> = b.iter().map(|b| (b.width, b.height)).collect();
        assert_eq!(got, expect);
    }

    #[test]
    fn aspect_ratios_map_to_expected_buckets() {
        let g = grid(512, false);
        let cases = [
            ((1000, 1000), (512, 512)),
            ((300, 300), (512, 512)),
            ((1920, 1080), (640, 384)),
            ((1080, 1920), (384, 640)),
            ((4000, 1000), (1024, 256)),
            ((800, 600), (576, 448)),
            ((448, 576), (448, 576)), // exact size wins
        ];
        for ((w, h), (bw, bh)) in cases {
            let p = g.place(w, h).expect("placed");
            assert_eq!((p.bucket.width, p.bucket.height), (bw, bh), "{w}x{h}");
            assert!(p.resized.0 >= bw && p.resized.1 >= bh);
            // one side matches the bucket exactly (cover, no padding)
            assert!(p.resized.0 == bw || p.resized.1 == bh, "{p:?}");
        }
    }

    #[test]
    fn no_upscale_buckets_never_exceed_the_image_or_area() {
        let g = grid(512, true);
        for (w, h) in [
            (300, 200),
            (2000, 1000),
            (513, 700),
            (4000, 3000),
            (100, 1000),
        ] {
            let p = g.place(w, h).expect("placed");
            assert!(p.bucket.width <= p.resized.0 && p.bucket.height <= p.resized.1);
            assert!(p.resized.0 <= w && p.resized.1 <= h, "{w}x{h} {p:?}");
            assert!(p.bucket.width as u64 * p.bucket.height as u64 <= 512 * 512);
            assert_eq!(p.bucket.width % 64, 0);
            assert_eq!(p.bucket.height % 64, 0);
        }
        assert_eq!(
            g.place(300, 200).map(|p| p.bucket),
            Some(Bucket::new(256, 192))
        );
        assert_eq!(g.place(40, 400), None);
    }

    #[test]
    fn crop_offsets_stay_inside() {
        let b = Bucket::new(512, 512);
        assert_eq!(crop_offset((700, 512), b, None), (94, 0));
        let mut rng = SeededRng::new(3);
        for _ in 0..200 {
            let (l, t) = crop_offset((700, 530), b, Some(&mut rng));
            assert!(l <= 188 && t <= 18);
        }
    }

    #[test]
    fn round_to_steps_matches_kohya() {
        assert_eq!(round_to_steps(127.4, 64), 64);
        assert_eq!(round_to_steps(127.6, 64), 128);
        assert_eq!(round_to_steps(63.0, 64), 0);
    }
}
