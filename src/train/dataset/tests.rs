//! Dataset tests on small images written to a temp dir.

use std::collections::HashMap;
use std::fs;
use std::path::Path;

use super::*;

fn write_png(path: &Path, w: u32, h: u32) {
    let img =
        image::RgbImage::from_fn(w, h, |x, y| image::Rgb([(x * 7) as u8, (y * 5) as u8, 128]));
    img.save(path).expect("write png");
}

fn write_jpg(path: &Path, w: u32, h: u32) {
    let img = image::RgbImage::from_fn(w, h, |x, _| image::Rgb([(x % 256) as u8, 10, 200]));
    img.save(path).expect("write jpg");
}

/// The pixels and content hash of one use of an image, loaded as the trainer
/// loads them: the item's augmentation, then [`Dataset::load_pixels`].
fn load(ds: &Dataset, item: &BatchItem) -> (Tensor, ContentHash) {
    let augment = ds.augment(item).expect("augment");
    let (pixels, _, hash) = ds.load_pixels(item.image, &augment).expect("load");
    (pixels, hash)
}

fn config(folders: &[&Path]) -> DatasetConfig {
    DatasetConfig {
        folders: folders.iter().map(|p| FolderConfig::new(*p)).collect(),
        resolution: Resolution::square(64),
        min_bucket_reso: 32,
        max_bucket_reso: 128,
        bucket_reso_steps: 16,
        ..Default::default()
    }
}

/// `root/10_sks dog/{a.png,b.jpg,a.txt}`, `root/3_cat/c.png`, `root/misc/`.
fn kohya_tree(root: &Path) {
    let dog = root.join("10_sks dog");
    let cat = root.join("3_cat");
    let misc = root.join("misc");
    for d in [&dog, &cat, &misc] {
        fs::create_dir_all(d).expect("mkdir");
    }
    write_png(&dog.join("a.png"), 64, 64);
    fs::write(
        dog.join("a.txt"),
        "sks dog, Red collar, grass\nsecond line ignored\n",
    )
    .expect("caption");
    write_jpg(&dog.join("b.JPG"), 96, 64);
    write_png(&cat.join("c.png"), 64, 96);
    write_png(&misc.join("ignored.png"), 64, 64);
    fs::write(root.join("notes.md"), "not an image").expect("notes");
}

#[test]
fn repeat_folders_give_repeats_and_class_tokens() {
    let dir = tempfile::tempdir().expect("tempdir");
    kohya_tree(dir.path());
    let (ds, report) = Dataset::scan_reporting(&config(&[dir.path()])).expect("scan");
    assert_eq!(ds.images().len(), 3);
    assert_eq!(ds.len(), 10 + 10 + 3);
    let by_name: HashMap<String, &DatasetImage> = ds
        .images()
        .iter()
        .map(|i| {
            (
                i.path.file_name().unwrap().to_string_lossy().into_owned(),
                i,
            )
        })
        .collect();
    let a = by_name["a.png"];
    assert_eq!(a.folder, "10_sks dog");
    assert_eq!(a.num_repeats, 10);
    assert_eq!(a.caption, "sks dog, Red collar, grass");
    assert_eq!(a.caption_source, CaptionSource::File);
    let b = by_name["b.JPG"];
    assert_eq!(b.caption, "sks dog");
    assert_eq!(b.caption_source, CaptionSource::ClassTokens);
    assert_eq!(by_name["c.png"].num_repeats, 3);
    assert_eq!(by_name["c.png"].caption, "cat");
    assert_eq!(report.ignored_folders, vec![dir.path().join("misc")]);
    assert_eq!(report.missing_captions.len(), 2);
    let dirs = ds.dataset_dirs();
    assert_eq!(
        dirs["10_sks dog"],
        DirInfo {
            n_repeats: 10,
            img_count: 2
        }
    );
}

#[test]
fn image_folder_listed_directly_uses_its_name_and_overrides() {
    let dir = tempfile::tempdir().expect("tempdir");
    kohya_tree(dir.path());
    let dog = dir.path().join("10_sks dog");
    let plain = dir.path().join("misc");
    let mut cfg = config(&[&dog, &plain]);
    cfg.folders[0].num_repeats = Some(2);
    let ds = Dataset::scan(&cfg).expect("scan");
    assert_eq!(ds.images().len(), 3);
    assert_eq!(ds.len(), 2 * 2 + 1);
    let ignored = ds
        .images()
        .iter()
        .find(|i| i.folder == "misc")
        .expect("misc image");
    assert_eq!(ignored.num_repeats, 1);
    assert_eq!(ignored.caption, "");
    assert_eq!(ignored.caption_source, CaptionSource::Missing);
}

#[test]
fn caption_extension_falls_back_between_txt_and_caption() {
    let dir = tempfile::tempdir().expect("tempdir");
    write_png(&dir.path().join("x.png"), 64, 64);
    fs::write(dir.path().join("x.caption"), "  from caption file  ").expect("caption");
    write_png(&dir.path().join("y.png"), 64, 64);
    fs::write(dir.path().join("y.txt"), "").expect("empty caption");
    let ds = Dataset::scan(&config(&[dir.path()])).expect("scan");
    assert_eq!(ds.images()[0].caption, "from caption file");
    assert_eq!(ds.images()[1].caption, "");
    assert_eq!(ds.images()[1].caption_source, CaptionSource::File);

    let mut cfg = config(&[dir.path()]);
    cfg.caption_extension = "md".into();
    fs::write(dir.path().join("y.md"), "markdown caption").expect("md");
    let ds = Dataset::scan(&cfg).expect("scan");
    assert_eq!(ds.images()[1].caption, "markdown caption");
    assert_eq!(ds.images()[0].caption_source, CaptionSource::Missing);
}

#[test]
fn corrupt_images_are_skipped_and_reported() {
    let dir = tempfile::tempdir().expect("tempdir");
    write_png(&dir.path().join("good.png"), 64, 64);
    fs::write(dir.path().join("bad.png"), b"definitely not a png").expect("bad");
    fs::write(dir.path().join("bad2.webp"), b"RIFF....").expect("bad2");
    fs::write(dir.path().join(".hidden.png"), b"junk").expect("hidden");
    let (ds, report) = Dataset::scan_reporting(&config(&[dir.path()])).expect("scan");
    assert_eq!(ds.images().len(), 1);
    let skipped: Vec<_> = report.skipped.iter().map(|s| s.path.clone()).collect();
    assert_eq!(
        skipped,
        vec![dir.path().join("bad.png"), dir.path().join("bad2.webp")]
    );
    assert!(report.skipped.iter().all(|s| !s.reason.is_empty()));
}

#[test]
fn empty_or_missing_folders_are_errors_naming_the_path() {
    let dir = tempfile::tempdir().expect("tempdir");
    let empty = dir.path().join("empty");
    fs::create_dir(&empty).expect("mkdir");
    let err = Dataset::scan(&config(&[&empty])).expect_err("empty");
    assert!(matches!(err, DatasetError::EmptyFolder { .. }));
    assert!(
        err.to_string().contains(&empty.display().to_string()),
        "{err}"
    );

    fs::write(empty.join("broken.jpg"), b"xx").expect("broken");
    let err = Dataset::scan(&config(&[&empty])).expect_err("only broken");
    assert!(err.to_string().contains("1 unreadable"), "{err}");

    let missing = dir.path().join("nope");
    let err = Dataset::scan(&config(&[&missing])).expect_err("missing");
    assert!(matches!(err, DatasetError::FolderNotFound { .. }));
    assert!(
        err.to_string().contains(&missing.display().to_string()),
        "{err}"
    );
}

#[test]
fn validation_names_the_bad_field() {
    let field_of = |cfg: DatasetConfig| match cfg.validate() {
        Err(DatasetError::Config { field, .. }) => field,
        other => panic!("expected a config error, got {other:?}"),
    };
    let base = config(&[Path::new("x")]);
    assert_eq!(field_of(DatasetConfig::default()), "folders");
    assert_eq!(
        field_of(DatasetConfig {
            bucket_reso_steps: 40,
            ..base.clone()
        }),
        "bucket_reso_steps"
    );
    assert_eq!(
        field_of(DatasetConfig {
            caption_dropout_rate: 1.5,
            ..base.clone()
        }),
        "caption_dropout_rate"
    );
    assert_eq!(
        field_of(DatasetConfig {
            min_bucket_reso: 128,
            ..base.clone()
        }),
        "min_bucket_reso"
    );
    // Sizes a request could make huge (or overflow the bucket arithmetic) are refused.
    assert_eq!(
        field_of(DatasetConfig {
            max_bucket_reso: u32::MAX,
            ..base.clone()
        }),
        "max_bucket_reso"
    );
    assert_eq!(
        field_of(DatasetConfig {
            enable_bucket: false,
            resolution: Resolution {
                width: 65536,
                height: 65536
            },
            ..base.clone()
        }),
        "resolution"
    );
    assert_eq!(
        field_of(DatasetConfig {
            enable_bucket: false,
            resolution: Resolution {
                width: 100,
                height: 64
            },
            ..base.clone()
        }),
        "resolution"
    );
    let mut zero = base.clone();
    zero.folders[0].num_repeats = Some(0);
    assert_eq!(field_of(zero), "folders[0].num_repeats");
    assert!(base.validate().is_ok());
}

#[test]
fn config_parses_kohya_style_json() {
    let cfg: DatasetConfig = serde_json::from_str(
        r#"{"folders": ["/data/img", {"path": "/data/10_x", "num_repeats": 3, "class_tokens": "x"}],
            "resolution": [768, 512], "shuffle_caption": true, "keep_tokens": 1}"#,
    )
    .expect("parse");
    assert_eq!(cfg.folders[0], FolderConfig::new("/data/img"));
    assert_eq!(cfg.folders[1].num_repeats, Some(3));
    assert_eq!(
        cfg.resolution,
        Resolution {
            width: 768,
            height: 512
        }
    );
    assert_eq!(cfg.caption_extension, ".txt");
    assert_eq!(cfg.bucket_reso_steps, 64);
    let square: DatasetConfig = serde_json::from_str(r#"{"resolution": 1024}"#).expect("square");
    assert_eq!(square.resolution, Resolution::square(1024));
    let back = serde_json::to_string(&cfg).expect("serialize");
    let again: DatasetConfig = serde_json::from_str(&back).expect("round trip");
    assert_eq!(again, cfg);

    let err = serde_json::from_str::<DatasetConfig>(r#"{"resolutoin": 512}"#).expect_err("typo");
    assert!(err.to_string().contains("resolutoin"), "{err}");
    let err =
        serde_json::from_str::<DatasetConfig>(r#"{"folders": [{"path": "a", "repeats": 2}]}"#)
            .expect_err("typo in folder");
    assert!(err.to_string().contains("repeats"), "{err}");
}

/// Images of several aspect ratios in one folder.
fn mixed_folder(root: &Path) {
    let sizes = [
        (64, 64),
        (128, 64),
        (64, 128),
        (100, 75),
        (75, 100),
        (50, 50),
        (200, 60),
    ];
    for (i, (w, h)) in sizes.iter().enumerate() {
        write_png(&root.join(format!("img{i}.png")), *w, *h);
        fs::write(
            root.join(format!("img{i}.txt")),
            format!("tag{i}, shared, other"),
        )
        .expect("caption");
    }
}

#[test]
fn buckets_are_multiples_of_16_within_area_and_crops_match() {
    let dir = tempfile::tempdir().expect("tempdir");
    mixed_folder(dir.path());
    let mut cfg = config(&[dir.path()]);
    cfg.random_crop = true;
    cfg.flip_aug = true;
    let ds = Dataset::scan(&cfg).expect("scan");
    assert!(ds.buckets.len() > 1, "{:?}", ds.buckets);
    for b in &ds.buckets {
        assert_eq!(b.width % 16, 0);
        assert_eq!(b.height % 16, 0);
        assert!(b.width * b.height <= 64 * 64, "{b:?}");
    }
    for batch in ds.epoch_batches(0, 2, 1) {
        for item in &batch.items {
            let (pixels, content_hash) = load(&ds, item);
            assert_eq!(
                pixels.dims(),
                &[3, batch.bucket.height as usize, batch.bucket.width as usize]
            );
            let v: Vec<f32> = pixels.flatten_all().unwrap().to_vec1().unwrap();
            assert!(v.iter().all(|x| (-1.0..=1.0).contains(x)));
            assert_eq!(content_hash, ds.content_hash(item.image).unwrap());
        }
    }
    let wide = ds
        .images()
        .iter()
        .find(|i| i.size == (128, 64))
        .expect("wide");
    assert!(wide.placement.bucket.width > wide.placement.bucket.height);
}

#[test]
fn flip_mirrors_the_crop() {
    let dir = tempfile::tempdir().expect("tempdir");
    write_png(&dir.path().join("a.png"), 64, 64);
    let ds = Dataset::scan(&config(&[dir.path()])).expect("scan");
    let plain = ds.plain_augment(0).expect("augment");
    let flipped = Augment {
        flip: true,
        ..plain
    };
    let (a, _, _) = ds.load_pixels(0, &plain).expect("load");
    let (b, size, _) = ds.load_pixels(0, &flipped).expect("load flipped");
    assert_eq!(size, (64, 64));
    let a: Vec<Vec<Vec<f32>>> = a.to_vec3().unwrap();
    let b: Vec<Vec<Vec<f32>>> = b.to_vec3().unwrap();
    assert_ne!(a, b);
    for c in 0..3 {
        for y in 0..64 {
            for x in 0..64 {
                assert_eq!(a[c][y][x], b[c][y][63 - x]);
            }
        }
    }
    // exact pixel values survive (no resize for a bucket-sized image)
    assert!((a[2][0][0] - (128.0 / 127.5 - 1.0)).abs() < 1e-6);
}

#[test]
fn epoch_batches_are_single_bucket_complete_and_deterministic() {
    let dir = tempfile::tempdir().expect("tempdir");
    let sub = dir.path().join("3_mixed");
    fs::create_dir(&sub).expect("mkdir");
    mixed_folder(&sub);
    let one = dir.path().join("2_one");
    fs::create_dir(&one).expect("mkdir");
    write_png(&one.join("z.png"), 64, 64);
    let ds = Dataset::scan(&config(&[dir.path()])).expect("scan");
    assert_eq!(ds.len(), 7 * 3 + 2);
    for bs in [1, 2, 3, 4] {
        let batches = ds.epoch_batches(5, bs, 1234);
        assert_eq!(batches.len(), ds.steps_per_epoch(bs));
        let mut counts = vec![0usize; ds.images().len()];
        for b in &batches {
            assert!(!b.items.is_empty() && b.items.len() <= bs);
            for it in &b.items {
                assert_eq!(ds.images()[it.image].placement.bucket, b.bucket);
                counts[it.image] += 1;
            }
        }
        for (i, c) in counts.iter().enumerate() {
            assert_eq!(*c, ds.images()[i].num_repeats as usize, "image {i}");
        }
    }
    let a = ds.epoch_batches(5, 2, 1234);
    assert_eq!(a, ds.epoch_batches(5, 2, 1234));
    assert_ne!(a, ds.epoch_batches(6, 2, 1234));
    assert_ne!(a, ds.epoch_batches(5, 2, 99));
    // the per-use randomness follows the item seeds
    let item = a[0].items[0];
    assert_eq!(ds.caption(&item).unwrap(), ds.caption(&item).unwrap());
    assert_eq!(ds.augment(&item).unwrap(), ds.augment(&item).unwrap());
}

#[test]
fn tag_frequency_has_kohya_structure() {
    let dir = tempfile::tempdir().expect("tempdir");
    kohya_tree(dir.path());
    let ds = Dataset::scan(&config(&[dir.path()])).expect("scan");
    let json = serde_json::to_value(ds.tag_frequency()).expect("json");
    assert_eq!(
        json,
        serde_json::json!({
            "10_sks dog": {"sks dog": 2, "red collar": 1, "grass": 1},
            "3_cat": {"cat": 1}
        })
    );
    let info = serde_json::to_value(ds.bucket_info().expect("buckets on")).expect("json");
    let total: u64 = info["buckets"]
        .as_object()
        .expect("object")
        .values()
        .map(|b| b["count"].as_u64().unwrap())
        .sum();
    assert_eq!(total as usize, ds.len());
    assert!(info["buckets"]["0"]["resolution"].is_array());
}

#[test]
fn captions_get_trigger_and_weights_only_when_enabled() {
    let dir = tempfile::tempdir().expect("tempdir");
    write_png(&dir.path().join("a.png"), 64, 64);
    fs::write(dir.path().join("a.txt"), "a (red:1.5) ball").expect("caption");
    let mut cfg = config(&[dir.path()]);
    cfg.trigger_word = Some("ohwx".into());
    let ds = Dataset::scan(&cfg).expect("scan");
    let item = ds.epoch_batches(0, 1, 0)[0].items[0];
    let c = ds.caption(&item).unwrap();
    assert_eq!(c.text, "ohwx, a (red:1.5) ball");
    assert_eq!(c.weighted, None);
    assert!(ds.captions_are_static());
    assert_eq!(ds.fixed_caption(0).unwrap(), c);

    cfg.weighted_captions = true;
    let ds = Dataset::scan(&cfg).expect("scan");
    let c = ds.caption(&item).unwrap();
    assert_eq!(c.text, "ohwx, a red ball");
    let w = c.weighted.expect("weighted");
    assert_eq!(w.len(), 3);
    assert_eq!(w[1].text, "red");
    assert!((w[1].weight - 1.5).abs() < 1e-6);
}

#[test]
fn no_upscale_mode_skips_tiny_images() {
    let dir = tempfile::tempdir().expect("tempdir");
    write_png(&dir.path().join("ok.png"), 100, 70);
    write_png(&dir.path().join("tiny.png"), 10, 10);
    let mut cfg = config(&[dir.path()]);
    cfg.bucket_no_upscale = true;
    let (ds, report) = Dataset::scan_reporting(&cfg).expect("scan");
    assert_eq!(ds.images().len(), 1);
    assert_eq!(report.skipped.len(), 1);
    let p = ds.images()[0].placement;
    assert!(p.bucket.width <= 100 && p.bucket.height <= 70);
    assert!(p.bucket.width as u64 * p.bucket.height as u64 <= 64 * 64);
    let batch = &ds.epoch_batches(0, 1, 0)[0];
    let (pixels, _) = load(&ds, &batch.items[0]);
    assert_eq!(
        pixels.dims(),
        &[3, p.bucket.height as usize, p.bucket.width as usize]
    );
}

#[test]
fn without_buckets_every_image_is_cropped_to_the_resolution() {
    let dir = tempfile::tempdir().expect("tempdir");
    mixed_folder(dir.path());
    let mut cfg = config(&[dir.path()]);
    cfg.enable_bucket = false;
    cfg.resolution = Resolution {
        width: 64,
        height: 48,
    };
    let ds = Dataset::scan(&cfg).expect("scan");
    assert_eq!(ds.buckets, [Bucket::new(64, 48)]);
    assert_eq!(ds.bucket_info(), None);
    let item = ds.epoch_batches(0, 1, 3)[0].items[0];
    assert_eq!(load(&ds, &item).0.dims(), &[3, 48, 64]);
}

#[test]
fn content_hash_is_of_the_file_bytes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("a.png");
    write_png(&path, 64, 64);
    let ds = Dataset::scan(&config(&[dir.path()])).expect("scan");
    let bytes = fs::read(&path).expect("read");
    assert_eq!(ds.content_hash(0).unwrap(), ContentHash::of(&bytes));
    assert_eq!(ds.content_hash(0).unwrap().to_string().len(), 16);
}
