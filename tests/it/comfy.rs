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
