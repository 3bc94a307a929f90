//! The ComfyUI dialect on the real server: discovery routes, both bare and
//! under `/api/`, and `/view` confined to ComfyUI's folders.

use serde_json::Value;

use crate::support::app::{spawn_app, App};

fn app() -> (tempfile::TempDir, App) {
    let tmp = tempfile::tempdir().unwrap();
    let app = spawn_app(&tmp.path().join("data"), vec![], "127.0.0.1", None);
    (tmp, app)
}

#[test]
fn discovery_routes_answer_bare_and_under_api() {
    let (_tmp, app) = app();
    for prefix in ["", "/api"] {
        let info = app.get(&format!("{prefix}/object_info"));
        assert_eq!(info.status, 200);
        let info = info.json();
        for class in [
            "FluxLoraTrain",
            "FluxLoraLoader",
            "FluxLoraLiveAdapter",
            "FluxLoraSampler",
        ] {
            assert_eq!(info[class]["name"], class, "{prefix}");
        }
        let one = app
            .get(&format!("{prefix}/object_info/FluxLoraSampler"))
            .json();
        assert_eq!(one.as_object().unwrap().len(), 1);
        assert_eq!(one["FluxLoraSampler"]["output_node"], true);
        // An unknown class is 200 `{}` in ComfyUI, not 404.
        let none = app.get(&format!("{prefix}/object_info/NoSuchNode"));
        assert_eq!((none.status, none.json()), (200, serde_json::json!({})));
        let stats = app.get(&format!("{prefix}/system_stats")).json();
        assert!(stats["system"]["os"].is_string(), "{stats}");
        assert_eq!(stats["devices"][0]["type"], "cpu");
        for empty in ["/embeddings", "/extensions"] {
            assert_eq!(
                app.get(&format!("{prefix}{empty}")).json(),
                serde_json::json!([])
            );
        }
        let features = app.get(&format!("{prefix}/features")).json();
        assert!(features["max_upload_size"].as_u64().unwrap() > 0);
        let folders = app.get(&format!("{prefix}/models")).json();
        assert!(folders.as_array().unwrap().contains(&Value::from("loras")));
        assert_eq!(
            app.get(&format!("{prefix}/models/loras")).json(),
            serde_json::json!([])
        );
        assert_eq!(app.get(&format!("{prefix}/models/nope")).status, 404);
    }
}

#[test]
fn view_serves_files_of_its_folders_and_refuses_escapes() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let app = spawn_app(&data, vec![], "127.0.0.1", None);
    std::fs::create_dir_all(data.join("output/sub")).unwrap();
    std::fs::write(data.join("output/sub/a.png"), b"\x89PNG fake").unwrap();
    std::fs::write(data.join("output/b.png"), b"b").unwrap();
    std::fs::write(data.join("secret.txt"), b"secret").unwrap();
    let ok = app.get("/view?filename=a.png&subfolder=sub&type=output");
    assert_eq!(ok.status, 200);
    assert_eq!(ok.body, b"\x89PNG fake");
    assert_eq!(ok.content_type, "image/png");
    assert_eq!(
        ok.header("x-content-type-options").as_deref(),
        Some("nosniff")
    );
    assert_eq!(app.get("/api/view?filename=b.png").body, b"b");
    for (query, status) in [
        ("filename=..%2Fsecret.txt", 400),
        ("filename=%2E%2E%2Fsecret.txt", 400),
        ("filename=../secret.txt", 400),
        ("filename=/etc/passwd", 400),
        ("filename=%2Fetc%2Fpasswd", 400),
        ("filename=", 400),
        ("filename=b.png&type=models", 400),
        ("filename=secret.txt&subfolder=..", 403),
        ("filename=secret.txt&subfolder=%2E%2E", 403),
        ("filename=passwd&subfolder=/etc", 403),
        ("filename=secret.txt&subfolder=sub/../..", 403),
        ("filename=nope.png", 404),
        ("type=output", 404),
    ] {
        let r = app.get(&format!("/view?{query}"));
        assert_eq!(
            r.status,
            status,
            "{query}: {}",
            String::from_utf8_lossy(&r.body)
        );
        assert!(!r.body.starts_with(b"secret"), "{query}");
    }
    // The daemon still answers.
    assert_eq!(app.get("/object_info").status, 200);
}

/// A valid one-node graph: the sampler without LoRAs.
fn sampler() -> Value {
    serde_json::json!({"class_type": "FluxLoraSampler", "inputs": {
        "prompt": "a red circle", "width": 64, "height": 64, "steps": 2,
        "guidance": 0.0, "seed": 1, "batch_size": 1}})
}

fn loader(lora: &str, chain: Option<&str>) -> Value {
    let mut inputs = serde_json::json!({"lora_name": lora, "strength": 1.0});
    if let Some(source) = chain {
        inputs["loras"] = serde_json::json!([source, 0]);
    }
    serde_json::json!({"class_type": "FluxLoraLoader", "inputs": inputs})
}

#[test]
fn invalid_graphs_get_comfyui_shaped_400s_and_nothing_runs() {
    use serde_json::json;
    let (_tmp, app) = app();
    let with = |edit: &dyn Fn(&mut Value)| {
        let mut prompt = json!({"1": sampler()});
        edit(&mut prompt);
        json!({"prompt": prompt, "client_id": "t"})
    };
    // (case, body, whole error type, (node, node error type))
    type Case = (
        &'static str,
        Value,
        &'static str,
        Option<(&'static str, &'static str)>,
    );
    let cases: Vec<Case> = vec![
        ("no prompt", json!({"client_id": "t"}), "no_prompt", None),
        (
            "unknown class",
            with(&|p| p["2"] = json!({"class_type": "NoSuchNode", "inputs": {}})),
            "missing_node_type",
            None,
        ),
        (
            "no output node",
            json!({"prompt": {"2": loader("x", None)}}),
            "prompt_no_outputs",
            None,
        ),
        (
            "required input missing",
            with(&|p| {
                p["1"]["inputs"].as_object_mut().unwrap().remove("prompt");
            }),
            "prompt_outputs_failed_validation",
            Some(("1", "required_input_missing")),
        ),
        (
            "link to a missing node",
            with(&|p| p["1"]["inputs"]["loras"] = json!(["9", 0])),
            "prompt_outputs_failed_validation",
            Some(("1", "exception_during_validation")),
        ),
        (
            "link to a missing output",
            with(&|p| {
                p["2"] = loader("x", None);
                p["1"]["inputs"]["loras"] = json!(["2", 3]);
            }),
            "prompt_outputs_failed_validation",
            Some(("1", "exception_during_validation")),
        ),
        (
            "link of the wrong type",
            with(&|p| {
                p["2"] = loader("x", None);
                p["1"]["inputs"]["prompt"] = json!(["2", 0]);
            }),
            "prompt_outputs_failed_validation",
            Some(("1", "return_type_mismatch")),
        ),
        (
            "INT above max",
            with(&|p| p["1"]["inputs"]["width"] = json!(5000)),
            "prompt_outputs_failed_validation",
            Some(("1", "value_bigger_than_max")),
        ),
        (
            "INT below min",
            with(&|p| p["1"]["inputs"]["batch_size"] = json!(0)),
            "prompt_outputs_failed_validation",
            Some(("1", "value_smaller_than_min")),
        ),
        (
            "not a number",
            with(&|p| p["1"]["inputs"]["steps"] = json!("many")),
            "prompt_outputs_failed_validation",
            Some(("1", "invalid_input_type")),
        ),
        (
            "LoRA not in the folder's list",
            with(&|p| {
                p["2"] = loader("nope.safetensors", None);
                p["1"]["inputs"]["loras"] = json!(["2", 0]);
            }),
            "prompt_outputs_failed_validation",
            Some(("2", "value_not_in_list")),
        ),
        (
            "cycle",
            with(&|p| {
                p["2"] = loader("x", Some("3"));
                p["3"] = loader("x", Some("2"));
                p["1"]["inputs"]["loras"] = json!(["2", 0]);
            }),
            "prompt_outputs_failed_validation",
            Some(("2", "dependency_cycle")),
        ),
    ];
    for prefix in ["", "/api"] {
        for (case, body, whole, node) in &cases {
            let r = app.post(&format!("{prefix}/prompt"), body);
            assert_eq!(
                r.status,
                400,
                "{case}: {}",
                String::from_utf8_lossy(&r.body)
            );
            let r = r.json();
            assert_eq!(r["error"]["type"], *whole, "{case}: {r}");
            for key in ["message", "details", "extra_info"] {
                assert!(!r["error"][key].is_null(), "{case}: {key}: {r}");
            }
            match node {
                None => assert_eq!(r["node_errors"], json!({}), "{case}: {r}"),
                Some((id, kind)) => {
                    let errors = &r["node_errors"][id];
                    assert!(
                        errors["errors"]
                            .as_array()
                            .is_some_and(|e| e.iter().any(|e| e["type"] == *kind)),
                        "{case}: {r}"
                    );
                    assert!(errors["class_type"].is_string(), "{case}: {r}");
                    assert!(errors["dependent_outputs"].is_array(), "{case}: {r}");
                }
            }
        }
    }
    // Nothing ran, and the daemon still answers.
    assert_eq!(app.get("/v1/jobs").json(), json!([]));
    assert_eq!(app.get("/object_info").status, 200);
}
