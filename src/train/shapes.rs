//! A procedurally generated dataset of coloured shapes on coloured backgrounds with
//! matching captions ("a red circle on a blue background"): the training data of
//! the built-in tiny model, of the LoRA demo and of the trainer's tests.
//!
//! Deterministic for a seed. Must not: train anything.

use std::path::Path;

use image::{Rgb, RgbImage};

use crate::atomic_file;
use crate::model::seeded::SeededRng;

/// Named colours and their RGB values.
pub(crate) const COLOURS: [(&str, [u8; 3]); 8] = [
    ("red", [220, 40, 40]),
    ("green", [40, 180, 60]),
    ("blue", [40, 70, 220]),
    ("yellow", [235, 215, 40]),
    ("white", [240, 240, 240]),
    ("black", [20, 20, 20]),
    ("purple", [140, 50, 180]),
    ("orange", [240, 140, 30]),
];

/// The shapes drawn.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Shape {
    Circle,
    Square,
    Triangle,
}

impl Shape {
    pub(crate) const ALL: [Shape; 3] = [Shape::Circle, Shape::Square, Shape::Triangle];

    pub(crate) fn name(self) -> &'static str {
        match self {
            Shape::Circle => "circle",
            Shape::Square => "square",
            Shape::Triangle => "triangle",
        }
    }

    /// Whether pixel (x, y) lies inside the shape centred at (cx, cy) with half-size r.
    pub(crate) fn contains(self, x: f64, y: f64, cx: f64, cy: f64, r: f64) -> bool {
        let (dx, dy) = (x - cx, y - cy);
        match self {
            Shape::Circle => dx * dx + dy * dy <= r * r,
            Shape::Square => dx.abs() <= r * 0.85 && dy.abs() <= r * 0.85,
            Shape::Triangle => {
                // Apex up; base at cy + r·0.8, apex at cy − r.
                let top = cy - r;
                let bottom = cy + r * 0.8;
                if y < top || y > bottom {
                    return false;
                }
                let half_width = r * (y - top) / (bottom - top);
                dx.abs() <= half_width
            }
        }
    }
}

/// One picture: what is drawn where.
#[derive(Clone, Debug, PartialEq)]
pub struct ShapeScene {
    pub shape: Shape,
    pub colour: usize,
    pub background: usize,
    /// Centre and half-size in pixels.
    pub cx: f64,
    pub cy: f64,
    pub r: f64,
}

impl ShapeScene {
    /// A random scene (shape colour differs from the background).
    pub(crate) fn random(rng: &mut SeededRng, size: u32) -> Self {
        let pick = |rng: &mut SeededRng, n: usize| (rng.next_u64() % n as u64) as usize;
        let shape = Shape::ALL[pick(rng, Shape::ALL.len())];
        let colour = pick(rng, COLOURS.len());
        let mut background = pick(rng, COLOURS.len() - 1);
        if background >= colour {
            background += 1;
        }
        let s = size as f64;
        let r = s * (0.22 + 0.1 * rng.uniform());
        let jitter = s * 0.08;
        Self {
            shape,
            colour,
            background,
            cx: s / 2.0 + jitter * (2.0 * rng.uniform() - 1.0),
            cy: s / 2.0 + jitter * (2.0 * rng.uniform() - 1.0),
            r,
        }
    }

    pub(crate) fn caption(&self) -> String {
        format!(
            "a {} {} on a {} background",
            COLOURS[self.colour].0,
            self.shape.name(),
            COLOURS[self.background].0
        )
    }

    /// Renders with 4×4 supersampled edges; `fill` overrides the shape's colour
    /// per pixel (used for patterned concepts).
    pub(crate) fn render(&self, size: u32, fill: Option<&dyn Fn(u32, u32) -> [u8; 3]>) -> RgbImage {
        let fg = COLOURS[self.colour].1;
        let bg = COLOURS[self.background].1;
        RgbImage::from_fn(size, size, |x, y| {
            let mut inside = 0;
            for sy in 0..4 {
                for sx in 0..4 {
                    let px = x as f64 + (sx as f64 + 0.5) / 4.0;
                    let py = y as f64 + (sy as f64 + 0.5) / 4.0;
                    if self.shape.contains(px, py, self.cx, self.cy, self.r) {
                        inside += 1;
                    }
                }
            }
            let colour = fill.map(|f| f(x, y)).unwrap_or(fg);
            let a = inside as f64 / 16.0;
            Rgb(std::array::from_fn(|c| {
                (a * colour[c] as f64 + (1.0 - a) * bg[c] as f64).round() as u8
            }))
        })
    }
}

/// Writes `count` random scenes as `NNNN.png` + `NNNN.txt` into `dir`; returns them.
pub fn write_dataset(
    dir: &Path,
    count: usize,
    size: u32,
    seed: u64,
) -> std::io::Result<Vec<ShapeScene>> {
    std::fs::create_dir_all(dir)?;
    let mut rng = SeededRng::for_name(seed, "shapes");
    let mut scenes = Vec::with_capacity(count);
    for i in 0..count {
        let scene = ShapeScene::random(&mut rng, size);
        write_pair(dir, i, &scene.render(size, None), &scene.caption())?;
        scenes.push(scene);
    }
    Ok(scenes)
}

/// A concept the base model has never seen: shapes filled with `rgb`, captioned
/// with `trigger` in place of a colour name ("a zorbly circle on a blue background").
#[derive(Clone, Debug)]
pub struct Concept {
    pub trigger: String,
    pub rgb: [u8; 3],
}

impl Concept {
    /// The demo's concept: a hot pink the tiny base was not trained on.
    pub fn demo() -> Self {
        Self {
            trigger: "zorbly".into(),
            rgb: [255, 80, 200],
        }
    }

    pub(crate) fn caption(&self, scene: &ShapeScene) -> String {
        format!(
            "a {} {} on a {} background",
            self.trigger,
            scene.shape.name(),
            COLOURS[scene.background].0
        )
    }
}

/// Writes `count` scenes of `concept` as `NNNN.png` + `NNNN.txt` into `dir`.
pub(crate) fn write_concept_dataset(
    dir: &Path,
    concept: &Concept,
    count: usize,
    size: u32,
    seed: u64,
) -> std::io::Result<Vec<ShapeScene>> {
    std::fs::create_dir_all(dir)?;
    let mut rng = SeededRng::for_name(seed, "concept");
    let fill = |_: u32, _: u32| concept.rgb;
    let mut scenes = Vec::with_capacity(count);
    for i in 0..count {
        let scene = ShapeScene::random(&mut rng, size);
        write_pair(
            dir,
            i,
            &scene.render(size, Some(&fill)),
            &concept.caption(&scene),
        )?;
        scenes.push(scene);
    }
    Ok(scenes)
}

fn write_pair(dir: &Path, i: usize, image: &RgbImage, caption: &str) -> std::io::Result<()> {
    let mut png = Vec::new();
    image
        .write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
        .map_err(std::io::Error::other)?;
    atomic_file::write(&dir.join(format!("{i:04}.png")), &png)?;
    atomic_file::write(&dir.join(format!("{i:04}.txt")), caption.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scenes_are_deterministic_and_captions_match() {
        let a = ShapeScene::random(&mut SeededRng::new(1), 64);
        let b = ShapeScene::random(&mut SeededRng::new(1), 64);
        assert_eq!(a, b);
        assert_ne!(a.colour, a.background);
        let img = a.render(64, None);
        let centre = img.get_pixel(a.cx as u32, a.cy as u32).0;
        assert_eq!(centre, COLOURS[a.colour].1);
        assert_eq!(img.get_pixel(0, 0).0, COLOURS[a.background].1);
        assert!(a
            .caption()
            .starts_with(&format!("a {} {}", COLOURS[a.colour].0, a.shape.name())));
    }
}
