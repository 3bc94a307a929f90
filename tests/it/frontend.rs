//! What the daemon serves ComfyUI's official front end, on the real server: its
//! static files at `/` (or a page saying how to get them), our extension's
//! modules, and the user routes (settings, saved workflows) persisted in the
//! data dir with paths confined to the user folder. The browser test
//! (`tests/browser/`) drives the real front end over these.

use serde_json::{json, Value};

use crate::support::app::{spawn_app, spawn_app_with, App};

/// A front end folder and an extension folder, with a secret beside them.
fn fake_frontend(root: &std::path::Path) -> (std::path::PathBuf, std::path::PathBuf) {
    let web = root.join("web");
    std::fs::create_dir_all(web.join("assets")).unwrap();
    std::fs::write(
        web.join("index.html"),
        "<!doctype html><title>ComfyUI</title>",
    )
    .unwrap();
    std::fs::write(web.join("assets/index-abc.js"), "export const x = 1;").unwrap();
    std::fs::write(web.join("assets/app.css"), "body {}").unwrap();
    std::fs::write(root.join("secret.txt"), "secret").unwrap();
    std::os::unix::fs::symlink(root.join("secret.txt"), web.join("assets/leak.js")).unwrap();
    let js = root.join("js");
    std::fs::create_dir_all(js.join("tests")).unwrap();
    std::fs::write(js.join("fluxlora.js"), "import './train_progress.js';").unwrap();
    std::fs::write(js.join("train_progress.js"), "export {};").unwrap();
    std::fs::write(js.join("tests/t.test.mjs"), "").unwrap();
    (web, js)
}

fn served(tmp: &std::path::Path) -> App {
    let (web, js) = fake_frontend(tmp);
    let listener = std::net::TcpListener::bind(("127.0.0.1", 0)).unwrap();
    spawn_app_with(listener, &tmp.join("data"), vec![], None, |s| {
        s.comfy_frontend = Some(web);
        s.comfy_js = Some(js);
    })
}

#[test]
fn without_a_front_end_the_root_says_how_to_get_one() {
    let tmp = tempfile::tempdir().unwrap();
    let app = spawn_app(&tmp.path().join("data"), vec![], "127.0.0.1", None);
    let page = app.get("/");
    assert_eq!(page.status, 200);
    assert!(page.content_type.starts_with("text/html"));
    let text = String::from_utf8_lossy(&page.body);
    assert!(
        text.contains("scripts/get-frontend.sh") && text.contains("1.58.1"),
        "{text}"
    );
    assert_eq!(app.get("/assets/index.js").status, 404);
}

#[test]
fn the_front_end_and_our_extension_are_served_and_confined() {
    let tmp = tempfile::tempdir().unwrap();
    let app = served(tmp.path());
    let index = app.get("/");
    assert_eq!(index.status, 200);
    assert!(String::from_utf8_lossy(&index.body).contains("ComfyUI"));
    assert_eq!(index.header("cache-control").as_deref(), Some("no-store"));
    let js = app.get("/assets/index-abc.js");
    assert_eq!(js.status, 200);
    assert!(
        js.content_type.starts_with("text/javascript"),
        "{}",
        js.content_type
    );
    assert!(app
        .get("/assets/app.css")
        .content_type
        .starts_with("text/css"));
    // Our extension: listed (tests left out) and served.
    assert_eq!(
        app.get("/api/extensions").json(),
        json!([
            "/extensions/fluxlora/fluxlora.js",
            "/extensions/fluxlora/train_progress.js"
        ])
    );
    let ext = app.get("/extensions/fluxlora/fluxlora.js");
    assert_eq!(ext.status, 200);
    assert_eq!(
        app.request("HEAD", "/extensions/fluxlora/fluxlora.js", None)
            .status,
        200
    );
    assert_eq!(
        app.request("HEAD", "/assets/index-abc.js", None).status,
        200
    );
    assert!(ext.content_type.starts_with("text/javascript"));
    for escape in [
        "/assets/../../secret.txt",
        "/assets/%2E%2E/%2E%2E/secret.txt",
        "/assets/..%2F..%2Fsecret.txt",
        "/assets/leak.js",
        "/extensions/fluxlora/../../secret.txt",
        "/extensions/fluxlora/%2E%2E/secret.txt",
        "//etc/passwd",
    ] {
        let r = app.get(escape);
        assert_eq!(r.status, 404, "{escape}");
        assert_ne!(r.body, b"secret", "{escape}");
    }
    // The small boot routes.
    for (path, want) in [
        ("/api/i18n", json!({})),
        ("/api/global_subgraphs", json!({})),
        ("/api/workflow_templates", json!({})),
        ("/templates/index.json", json!([])),
        ("/api/users", json!({"storage": "server", "migrated": true})),
    ] {
        assert_eq!(app.get(path).json(), want, "{path}");
    }
    assert_eq!(app.get("/api/experiment/models").json()[0]["name"], "loras");
    // Unknown API routes are still JSON 404s.
    assert_eq!(app.get("/v1/nope").status, 404);
}

#[test]
fn settings_and_workflows_persist_in_the_user_folder() {
    let tmp = tempfile::tempdir().unwrap();
    let app = served(tmp.path());
    let user = tmp.path().join("data/user/default");
    assert_eq!(app.get("/api/settings").json(), json!({}));
    assert_eq!(
        app.request(
            "POST",
            "/api/settings/Comfy.InstalledVersion",
            Some(br#""1.58.1""#)
        )
        .status,
        200
    );
    let merge = app.post(
        "/api/settings",
        &json!({"Comfy.Locale": "en", "Comfy.X": [1, 2]}),
    );
    assert_eq!(merge.status, 200);
    let settings = app.get("/api/settings").json();
    assert_eq!(settings["Comfy.InstalledVersion"], "1.58.1");
    assert_eq!(settings["Comfy.X"], json!([1, 2]));
    assert_eq!(app.get("/api/settings/Comfy.Locale").json(), "en");
    assert_eq!(app.get("/api/settings/Nope").json(), Value::Null);
    let on_disk: Value =
        serde_json::from_slice(&std::fs::read(user.join("comfy.settings.json")).unwrap()).unwrap();
    assert_eq!(on_disk, settings);
    assert_eq!(
        app.request("POST", "/api/settings", Some(b"[1]")).status,
        400
    );

    // Workflows: a missing folder lists as empty (ComfyUI's 404 means the same).
    assert_eq!(
        app.get("/api/userdata?dir=workflows&recurse=true").json(),
        json!([])
    );
    assert_eq!(app.get("/api/userdata/user.css").status, 200);
    assert_eq!(app.get("/user.css").status, 200);
    // Settings come as text/plain from the front end.
    let plain = app.request_with(
        "POST",
        "/api/settings/Comfy.Plain",
        Some(b"true"),
        &[("Content-Type", "text/plain;charset=UTF-8")],
    );
    assert_eq!(plain.status, 200);
    assert_eq!(app.get("/api/settings/Comfy.Plain").json(), true);
    let workflow = br#"{"nodes": []}"#;
    let saved = app.request(
        "POST",
        "/api/userdata/workflows%2Fa.json?overwrite=false&full_info=true",
        Some(workflow),
    );
    assert_eq!(
        saved.status,
        200,
        "{}",
        String::from_utf8_lossy(&saved.body)
    );
    assert_eq!(saved.json()["path"], "workflows/a.json");
    assert_eq!(
        std::fs::read(user.join("workflows/a.json")).unwrap(),
        workflow
    );
    let again = app.request(
        "POST",
        "/api/userdata/workflows%2Fa.json?overwrite=false",
        Some(workflow),
    );
    assert_eq!(again.status, 409);
    let list = app
        .get("/api/userdata?dir=workflows&recurse=true&split=false&full_info=true")
        .json();
    assert_eq!(list[0]["path"], "a.json");
    assert_eq!(list[0]["size"], workflow.len());
    assert_eq!(
        app.get("/api/userdata?dir=workflows").json(),
        json!(["a.json"])
    );
    assert_eq!(app.get("/api/userdata/workflows%2Fa.json").body, workflow);
    let moved = app.request(
        "POST",
        "/api/userdata/workflows%2Fa.json/move/workflows%2Fsub%2Fb.json",
        None,
    );
    assert_eq!(moved.status, 200);
    assert_eq!(moved.json(), "workflows/sub/b.json");
    assert_eq!(app.get("/api/userdata/workflows%2Fa.json").status, 404);
    assert_eq!(
        app.request("DELETE", "/api/userdata/workflows%2Fsub%2Fb.json", None)
            .status,
        204
    );
    assert_eq!(
        app.request("DELETE", "/api/userdata/workflows%2Fsub%2Fb.json", None)
            .status,
        404
    );

    // Paths that leave the user folder, or name the settings file.
    std::fs::write(tmp.path().join("data/secret.txt"), "secret").unwrap();
    for bad in [
        "..%2Fsecret.txt",
        "..%2F..%2Fsecret.txt",
        "workflows%2F..%2F..%2F..%2Fsecret.txt",
        "%2Fetc%2Fpasswd",
        "comfy.settings.json",
    ] {
        let read = app.get(&format!("/api/userdata/{bad}"));
        assert!(matches!(read.status, 400 | 403), "{bad}: {}", read.status);
        assert!(
            !String::from_utf8_lossy(&read.body).contains("secret\""),
            "{bad}"
        );
        let write = app.request("POST", &format!("/api/userdata/{bad}"), Some(b"x"));
        assert!(matches!(write.status, 400 | 403), "{bad}: {}", write.status);
    }
    assert_eq!(
        std::fs::read_to_string(tmp.path().join("data/secret.txt")).unwrap(),
        "secret"
    );
    assert_eq!(app.get("/api/userdata").status, 400);
}

#[test]
fn saved_workflows_and_settings_survive_a_daemon_restart() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let (mut daemon, app) = crate::support::app::spawn_process(&data, tmp.path());
    let workflow = br#"{"last_node_id": 6, "nodes": []}"#;
    let saved = app.request(
        "POST",
        "/api/userdata/workflows%2Ftrain.json",
        Some(workflow),
    );
    assert_eq!(saved.status, 200);
    let set = app.request("POST", "/api/settings/Comfy.Locale", Some(br#""fr""#));
    assert_eq!(set.status, 200);
    daemon.kill().unwrap();
    daemon.wait().unwrap();

    let (mut daemon, app) = crate::support::app::spawn_process(&data, tmp.path());
    assert_eq!(
        app.get("/api/userdata?dir=workflows").json(),
        json!(["train.json"])
    );
    assert_eq!(
        app.get("/api/userdata/workflows%2Ftrain.json").body,
        workflow
    );
    assert_eq!(app.get("/api/settings/Comfy.Locale").json(), "fr");
    daemon.kill().unwrap();
    daemon.wait().unwrap();
}
