//! Cross-optimizer tests: config parsing and validation, group checks,
//! gradient clipping, and bit-identical save/resume for every kind.

use std::collections::HashMap;

use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor, Var};

use super::testutil::*;
use super::*;

const ALL_KINDS: [OptimizerKind; 8] = [
    OptimizerKind::Adamw,
    OptimizerKind::Adamw8bit,
    OptimizerKind::Lion,
    OptimizerKind::Lion8bit,
    OptimizerKind::SgdNesterov,
    OptimizerKind::SgdNesterov8bit,
    OptimizerKind::Adafactor,
    OptimizerKind::Prodigy,
];

#[test]
fn config_parses_names_aliases_and_rejects_unknown_fields() {
    let cfg: OptimizerConfig =
        serde_json::from_str(r#"{"kind": "adamw8bit", "weight_decay": 0.05}"#).expect("parse");
    assert_eq!(cfg.kind, OptimizerKind::Adamw8bit);
    assert_eq!(cfg.resolved_weight_decay(), 0.05);
    for (alias, kind) in [
        ("AdamW8bit", OptimizerKind::Adamw8bit),
        ("Prodigy", OptimizerKind::Prodigy),
        ("SGDNesterov", OptimizerKind::SgdNesterov),
        ("sgd_nesterov8bit", OptimizerKind::SgdNesterov8bit),
        ("Lion8bit", OptimizerKind::Lion8bit),
        ("Adafactor", OptimizerKind::Adafactor),
    ] {
        let cfg: OptimizerConfig =
            serde_json::from_str(&format!(r#"{{"kind": "{alias}"}}"#)).expect(alias);
        assert_eq!(cfg.kind, kind, "{alias}");
    }
    assert!(serde_json::from_str::<OptimizerConfig>(r#"{"kind": "adamw", "lr": 1}"#).is_err());
    // Defaults of the reference implementations.
    assert_eq!(
        OptimizerConfig::new(OptimizerKind::Lion).resolved_betas(),
        (0.9, 0.99)
    );
    assert_eq!(
        OptimizerConfig::new(OptimizerKind::Adamw).resolved_betas(),
        (0.9, 0.999)
    );
    assert_eq!(
        OptimizerConfig::new(OptimizerKind::Adamw).resolved_weight_decay(),
        0.01
    );
    assert_eq!(
        OptimizerConfig::new(OptimizerKind::Lion).resolved_weight_decay(),
        0.0
    );
    assert_eq!(
        OptimizerConfig::new(OptimizerKind::Adafactor).resolved_eps(),
        1e-30
    );
    // Serialises back to the canonical name, omitting unset fields.
    let text = serde_json::to_string(&OptimizerConfig::new(OptimizerKind::SgdNesterov8bit))
        .expect("serialise");
    assert_eq!(text, r#"{"kind":"sgd_nesterov8bit"}"#);
}

#[test]
fn validate_names_the_bad_field() {
    let field_of = |cfg: OptimizerConfig| match cfg.validate() {
        Err(OptimError::InvalidConfig { field, .. }) => field,
        other => panic!("expected a config error, got {other:?}"),
    };
    let mut c = OptimizerConfig::new(OptimizerKind::Adamw);
    c.betas = Some([0.9, 1.0]);
    assert_eq!(field_of(c), "betas");
    let mut c = OptimizerConfig::new(OptimizerKind::Adamw);
    c.momentum = Some(0.9);
    assert_eq!(field_of(c), "momentum");
    let mut c = OptimizerConfig::new(OptimizerKind::Adamw);
    c.weight_decay = Some(-1.0);
    assert_eq!(field_of(c), "weight_decay");
    let mut c = OptimizerConfig::new(OptimizerKind::Adafactor);
    c.relative_step = Some(false);
    c.warmup_init = Some(true);
    assert_eq!(field_of(c), "warmup_init");
    let mut c = OptimizerConfig::new(OptimizerKind::Prodigy);
    c.d0 = Some(0.0);
    assert_eq!(field_of(c), "d0");
    let mut c = OptimizerConfig::new(OptimizerKind::Adamw);
    c.block_size = Some(256);
    assert_eq!(field_of(c), "block_size");
    let mut c = OptimizerConfig::new(OptimizerKind::Lion8bit);
    c.block_size = Some(3);
    assert_eq!(field_of(c), "block_size");
    let mut c = OptimizerConfig::new(OptimizerKind::SgdNesterov);
    c.momentum = Some(0.0);
    assert_eq!(field_of(c), "momentum");
    for kind in ALL_KINDS {
        OptimizerConfig::new(kind)
            .validate()
            .expect("defaults are valid");
    }
}

#[test]
fn build_rejects_bad_groups() {
    let cfg = OptimizerConfig::new(OptimizerKind::Adamw);
    let a = var(&[1.0]);
    let dup = build(
        &cfg,
        vec![
            group("x", vec![a.clone()], 0.1),
            group("y", vec![a.clone()], 0.1),
        ],
    );
    assert!(matches!(dup, Err(OptimError::InvalidGroups(_))));
    let same_name = build(
        &cfg,
        vec![
            group("x", vec![var(&[1.0])], 0.1),
            group("x", vec![var(&[1.0])], 0.1),
        ],
    );
    assert!(matches!(same_name, Err(OptimError::InvalidGroups(_))));
    let dotted = build(&cfg, vec![group("a.b", vec![var(&[1.0])], 0.1)]);
    assert!(matches!(dotted, Err(OptimError::InvalidGroups(_))));
    let negative = build(&cfg, vec![group("a", vec![var(&[1.0])], -0.1)]);
    assert!(matches!(negative, Err(OptimError::InvalidGroups(_))));
    let mut ok = build(&cfg, vec![group("a", vec![var(&[1.0])], 0.1)]).expect("valid");
    assert!(ok.set_lr(1, 0.1).is_err());
    assert!(ok.set_lr(0, f64::NAN).is_err());
    ok.set_lr(0, 0.2).expect("set lr");
    assert_eq!(ok.lr(0), Some(0.2));
    assert_eq!(ok.lr(1), None);
}

#[test]
fn clip_grad_norm_matches_pytorch() -> Result<()> {
    let a = var(&[0.0, 0.0]);
    let b = var(&[0.0]);
    let c = var(&[0.0]); // no gradient: ignored
    let mut g = grads(&[(&a, &[3.0, 0.0]), (&b, &[4.0])]);
    let norm = clip_grad_norm(&mut g, [&a, &b, &c, &a], 1.0)?;
    assert!((norm - 5.0).abs() < 1e-6);
    let coef = 1.0 / (5.0 + 1e-6);
    let ga: Vec<f32> = g.get(&a).expect("grad a").to_vec1()?;
    let gb: Vec<f32> = g.get(&b).expect("grad b").to_vec1()?;
    assert!((ga[0] as f64 - 3.0 * coef).abs() < 1e-6);
    assert!((gb[0] as f64 - 4.0 * coef).abs() < 1e-6);
    // Below the threshold nothing changes.
    let mut g = grads(&[(&a, &[0.3, 0.4])]);
    let norm = clip_grad_norm(&mut g, [&a], 1.0)?;
    assert!((norm - 0.5).abs() < 1e-6);
    assert_eq!(g.get(&a).expect("grad").to_vec1::<f32>()?, vec![0.3, 0.4]);
    // Non-finite: reported, gradients untouched.
    let mut g = grads(&[(&a, &[f64::INFINITY, 1.0])]);
    assert!(clip_grad_norm(&mut g, [&a], 1.0)?.is_infinite());
    assert_eq!(g.get(&a).expect("grad").to_vec1::<f32>()?[1], 1.0);
    assert!(clip_grad_norm(&mut g, [&a], 0.0).is_err());
    Ok(())
}

/// Parameters of the resume test: a 64×64 weight (8-bit path), a bias and a
/// small text-encoder matrix that starts at zero (LoRA "up" style).
fn make_vars(w: &[f32], b: &[f32], t: &[f32]) -> Result<Vec<Var>> {
    let dev = Device::Cpu;
    Ok(vec![
        Var::from_tensor(&Tensor::from_slice(w, (64, 64), &dev)?)?,
        Var::from_tensor(&Tensor::from_slice(b, 16, &dev)?)?,
        Var::from_tensor(&Tensor::from_slice(t, (8, 4), &dev)?)?,
    ])
}

fn make_groups(v: &[Var], base: f64) -> Vec<ParamGroup> {
    vec![
        group("dit", vec![v[0].clone(), v[1].clone()], base),
        group("te", vec![v[2].clone()], base * 0.5),
    ]
}

fn feed(opt: &mut dyn Optimizer, v: &[Var], step: u64, base: f64) -> Result<()> {
    // A schedule the trainer would apply.
    let mult = 1.0 - step as f64 / 10.0;
    opt.set_lr(0, base * mult)?;
    opt.set_lr(1, base * 0.5 * mult)?;
    let mut g = GradStore::default();
    for (i, p) in v.iter().enumerate() {
        if i == 2 && step == 1 {
            continue; // the text encoder has no gradient on step 1
        }
        let n = p.elem_count();
        // Gradient with a pull towards zero so the parameters matter.
        let noise = Tensor::from_vec(uniform(n, 100 * step + i as u64), p.shape(), p.device())?;
        g.insert(p, (noise + (p.as_tensor() * 0.5)?)?);
    }
    opt.step(&g)
}

#[test]
fn resume_continues_bit_identically_for_every_kind() -> Result<()> {
    let (n, k) = (6u64, 3u64);
    let w0 = uniform(4096, 1);
    let b0 = uniform(16, 2);
    let t0 = vec![0f32; 32];
    let dir = tempfile::tempdir().map_err(|e| OptimError::State(e.to_string()))?;
    for kind in ALL_KINDS {
        let cfg = OptimizerConfig::new(kind);
        let base = match kind {
            OptimizerKind::Prodigy => 1.0,
            _ => 0.01,
        };
        // Straight run.
        let va = make_vars(&w0, &b0, &t0)?;
        let mut a = build(&cfg, make_groups(&va, base))?;
        for s in 0..n {
            feed(a.as_mut(), &va, s, base)?;
        }
        // k steps, save, restore into fresh parameters and optimizer.
        let vb = make_vars(&w0, &b0, &t0)?;
        let mut b = build(&cfg, make_groups(&vb, base))?;
        for s in 0..k {
            feed(b.as_mut(), &vb, s, base)?;
        }
        let st = b.state()?;
        if kind.is_8bit() {
            let m = match kind {
                OptimizerKind::SgdNesterov8bit => "momentum_buffer",
                _ => "exp_avg",
            };
            assert_eq!(st.tensors[&format!("dit.0.{m}.codes")].dtype(), DType::U8);
            assert_eq!(
                st.tensors[&format!("dit.0.{m}.absmax")].dims(),
                &[4096 / 256]
            );
            // Below min_8bit_size: f32 state.
            assert_eq!(st.tensors[&format!("dit.1.{m}")].dtype(), DType::F32);
        }
        let path = dir.path().join(format!("{}.safetensors", kind.name()));
        candle_core::safetensors::save(&st.to_tensors()?, &path)?;
        let loaded: HashMap<String, Tensor> = candle_core::safetensors::load(&path, &Device::Cpu)?;
        let st2 = OptimizerState::from_tensors(&st.kind, loaded)?;
        assert_eq!(st2.step, k);
        assert_eq!(st2.scalars, st.scalars);
        let vals = |v: &Var| -> Result<Vec<f32>> { Ok(v.as_tensor().flatten_all()?.to_vec1()?) };
        let vc = make_vars(&vals(&vb[0])?, &vals(&vb[1])?, &vals(&vb[2])?)?;
        let mut c = build(&cfg, make_groups(&vc, base))?;
        c.load_state(&st2)?;
        assert_eq!(c.state()?.step, k);
        for s in k..n {
            feed(c.as_mut(), &vc, s, base)?;
        }
        for (i, (x, y)) in va.iter().zip(&vc).enumerate() {
            assert!(
                vals(x)? == vals(y)?,
                "{}: parameter {i} differs after resume",
                kind.name()
            );
            assert!(
                vals(x)? != vals(&make_vars(&w0, &b0, &t0)?[i])?,
                "{}: no progress",
                kind.name()
            );
        }
        // The restored optimizer's state equals the straight one's.
        let (sa, sc) = (a.state()?, c.state()?);
        assert_eq!(sa.scalars, sc.scalars, "{}", kind.name());
        for (key, ta) in &sa.tensors {
            let tc = &sc.tensors[key];
            let eq = ta.flatten_all()?.to_dtype(DType::F64)?.to_vec1::<f64>()?
                == tc.flatten_all()?.to_dtype(DType::F64)?.to_vec1::<f64>()?;
            assert!(eq, "{}: state {key} differs", kind.name());
        }
    }
    Ok(())
}

#[test]
fn load_state_rejects_foreign_states() -> Result<()> {
    let v = make_vars(&uniform(4096, 1), &uniform(16, 2), &[0.0; 32])?;
    let mut adam = build(
        &OptimizerConfig::new(OptimizerKind::Adamw),
        make_groups(&v, 0.01),
    )?;
    feed(adam.as_mut(), &v, 0, 0.01)?;
    let st = adam.state()?;
    // Another kind.
    let mut lion = build(
        &OptimizerConfig::new(OptimizerKind::Lion),
        make_groups(&v, 0.01),
    )?;
    assert!(matches!(lion.load_state(&st), Err(OptimError::State(_))));
    // Other groups: the `te` entries are left over.
    let mut fewer = build(
        &OptimizerConfig::new(OptimizerKind::Adamw),
        vec![group("dit", vec![v[0].clone(), v[1].clone()], 0.01)],
    )?;
    assert!(matches!(fewer.load_state(&st), Err(OptimError::State(_))));
    // Wrong shape.
    let mut bad = st.clone();
    bad.tensors.insert(
        "dit.1.exp_avg".into(),
        Tensor::zeros(3, DType::F32, &Device::Cpu)?,
    );
    let mut fresh = build(
        &OptimizerConfig::new(OptimizerKind::Adamw),
        make_groups(&v, 0.01),
    )?;
    assert!(matches!(fresh.load_state(&bad), Err(OptimError::State(_))));
    assert_eq!(fresh.state()?.step, 0, "a failed load changes nothing");
    fresh.load_state(&st)?;
    assert_eq!(fresh.state()?.step, 1);
    Ok(())
}

/// Gradients from a real `backward` still refer to the forward graph; an optimizer
/// that kept them (or values derived from them) in its state would chain every
/// step's graph to the next and leak memory. Its state must track nothing.
#[test]
fn optimizer_state_holds_no_graph() -> Result<()> {
    for kind in ALL_KINDS {
        let mut cfg = OptimizerConfig::new(kind);
        if kind.is_8bit() {
            cfg.min_8bit_size = Some(1);
        }
        let p = var(&[0.5, -1.0, 2.0, 0.25]);
        let x = tensor(&[1.0, 2.0, 3.0, 4.0]);
        let mut opt = build(&cfg, vec![group("g", vec![p.clone()], 0.01)])?;
        for _ in 0..2 {
            let loss = (p.as_tensor() * &x)?.sqr()?.sum_all()?;
            let grads = loss.backward()?;
            opt.step(&grads)?;
        }
        let state = opt.state()?;
        for (name, t) in &state.tensors {
            assert!(!t.track_op(), "{kind:?}: state `{name}` keeps a graph");
        }
        assert!(!p.as_tensor().detach().track_op());
    }
    Ok(())
}
