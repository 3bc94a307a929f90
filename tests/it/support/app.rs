//! A real server for the tests to talk to, and a client for it: [`spawn_app`]
//! starts the engine and the actix-web app on an ephemeral port in this process,
//! [`spawn_process`] starts `fluxlora serve` as a child process; [`App`] sends
//! HTTP/1.1 requests and opens `/v1/ws`, and the frame helpers read the WebSocket
//! as a client would (text events, binary previews decoded by their documented
//! header). No HTTP client crate: requests are written by hand, so the tests see
//! exactly what goes over the wire.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::time::{Duration, Instant};

use fluxlora::config::Settings;
use fluxlora::engine::Engine;
use fluxlora::server::{self, AppState};
use serde_json::Value;
use tungstenite::{Message, WebSocket};

pub type Ws = WebSocket<TcpStream>;

/// A running server and the token its requests carry.
pub struct App {
    pub addr: SocketAddr,
    pub token: Option<String>,
}

/// Starts engine + server on port 0 in a background thread (like `fluxlora serve`).
pub fn spawn_app(
    data_dir: &Path,
    roots: Vec<std::path::PathBuf>,
    host: &str,
    token: Option<&str>,
) -> App {
    let listener = std::net::TcpListener::bind((host, 0)).unwrap();
    spawn_app_on(listener, data_dir, roots, token)
}

/// [`spawn_app`] on a listener the test prepared.
pub fn spawn_app_on(
    listener: std::net::TcpListener,
    data_dir: &Path,
    roots: Vec<std::path::PathBuf>,
    token: Option<&str>,
) -> App {
    spawn_app_with(listener, data_dir, roots, token, |_| {})
}

/// [`spawn_app_on`] with further settings.
pub fn spawn_app_with(
    listener: std::net::TcpListener,
    data_dir: &Path,
    roots: Vec<std::path::PathBuf>,
    token: Option<&str>,
    edit: impl FnOnce(&mut Settings),
) -> App {
    let host = listener.local_addr().unwrap().ip().to_string();
    let mut settings = Settings {
        host,
        port: 0,
        data_dir: data_dir.to_path_buf(),
        token: token.map(str::to_string),
        roots,
        max_body_bytes: 64 * 1024,
        ..Settings::default()
    };
    edit(&mut settings);
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let bundle = super::bundle();
        let engine =
            Engine::start(bundle.clone(), &settings.data_dir, settings.lora_dir()).unwrap();
        let state = AppState::new(&settings, &bundle, engine);
        actix_web::rt::System::new().block_on(async move {
            let (server, addr) = server::start_on(listener, &settings, state).unwrap();
            tx.send(addr).unwrap();
            server.await
        })
    });
    App {
        addr: rx.recv_timeout(Duration::from_secs(30)).unwrap(),
        token: token.map(str::to_string),
    }
}

/// A response as read off the wire (chunked bodies decoded).
pub struct Response {
    pub status: u16,
    pub content_type: String,
    pub head: String,
    pub body: Vec<u8>,
}

impl Response {
    pub fn header(&self, name: &str) -> Option<String> {
        self.head.lines().find_map(|l| {
            l.split_once(':')
                .filter(|(k, _)| k.eq_ignore_ascii_case(name))
                .map(|(_, v)| v.trim().to_string())
        })
    }

    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&self.body)))
    }
}

impl App {
    /// One HTTP/1.1 request with `Connection: close`.
    pub fn request(&self, method: &str, path: &str, body: Option<&[u8]>) -> Response {
        self.request_with(method, path, body, &[])
    }

    pub fn request_with(
        &self,
        method: &str,
        path: &str,
        body: Option<&[u8]>,
        headers: &[(&str, &str)],
    ) -> Response {
        let mut stream = TcpStream::connect(self.addr).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(120)))
            .unwrap();
        let mut head = format!("{method} {path} HTTP/1.1\r\nConnection: close\r\n");
        if !headers.iter().any(|(k, _)| k.eq_ignore_ascii_case("host")) {
            head.push_str(&format!("Host: {}\r\n", self.addr));
        }
        if let Some(t) = &self.token {
            head.push_str(&format!("Authorization: Bearer {t}\r\n"));
        }
        for (k, v) in headers {
            head.push_str(&format!("{k}: {v}\r\n"));
        }
        if let Some(b) = body {
            if !headers
                .iter()
                .any(|(k, _)| k.eq_ignore_ascii_case("content-type"))
            {
                head.push_str("Content-Type: application/json\r\n");
            }
            head.push_str(&format!("Content-Length: {}\r\n", b.len()));
        }
        head.push_str("\r\n");
        stream.write_all(head.as_bytes()).unwrap();
        if let Some(b) = body {
            let _ = stream.write_all(b);
        }
        let mut raw = vec![];
        let _ = stream.read_to_end(&mut raw);
        let split = raw
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .expect("a response");
        let head = String::from_utf8_lossy(&raw[..split]).to_string();
        let status = head.split_whitespace().nth(1).unwrap().parse().unwrap();
        let mut response = Response {
            status,
            content_type: String::new(),
            head,
            body: raw[split + 4..].to_vec(),
        };
        if response
            .header("transfer-encoding")
            .is_some_and(|v| v.contains("chunked"))
        {
            response.body = dechunk(&response.body);
        }
        response.content_type = response.header("content-type").unwrap_or_default();
        response
    }

    /// Opens `/v1/ws?{query}` as a WebSocket client.
    pub fn ws(&self, query: &str) -> Ws {
        self.ws_with_headers(query, &[])
            .expect("WebSocket handshake")
    }

    pub fn ws_with_headers(&self, query: &str, headers: &[(&str, &str)]) -> Result<Ws, String> {
        self.ws_on(TcpStream::connect(self.addr).unwrap(), query, headers)
    }

    /// A WebSocket client of `/v1/ws` over a connection the test prepared.
    pub fn ws_on(
        &self,
        stream: TcpStream,
        query: &str,
        headers: &[(&str, &str)],
    ) -> Result<Ws, String> {
        self.ws_at(stream, "/v1/ws", query, headers)
    }

    /// A WebSocket client of ComfyUI's `/ws?clientId=`.
    pub fn comfy_ws(&self, client_id: &str) -> Ws {
        let stream = TcpStream::connect(self.addr).unwrap();
        self.ws_at(stream, "/ws", &format!("clientId={client_id}"), &[])
            .expect("WebSocket handshake")
    }

    /// A WebSocket client of `path` over a connection the test prepared.
    pub fn ws_at(
        &self,
        stream: TcpStream,
        path: &str,
        query: &str,
        headers: &[(&str, &str)],
    ) -> Result<Ws, String> {
        use tungstenite::client::IntoClientRequest;
        stream
            .set_read_timeout(Some(Duration::from_secs(120)))
            .unwrap();
        let mut url = format!("ws://{}{path}?{query}", self.addr);
        if let Some(t) = &self.token {
            url.push_str(&format!("&token={t}"));
        }
        let mut request = url.into_client_request().map_err(|e| e.to_string())?;
        for (k, v) in headers {
            request.headers_mut().insert(
                tungstenite::http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                tungstenite::http::HeaderValue::from_str(v).unwrap(),
            );
        }
        tungstenite::client(request, stream)
            .map(|(ws, _)| ws)
            .map_err(|e| match e {
                tungstenite::HandshakeError::Failure(e) => e.to_string(),
                tungstenite::HandshakeError::Interrupted(_) => "interrupted".into(),
            })
    }

    pub fn get(&self, path: &str) -> Response {
        self.request("GET", path, None)
    }

    pub fn post(&self, path: &str, body: &Value) -> Response {
        self.request("POST", path, Some(body.to_string().as_bytes()))
    }

    /// Queues a job (`POST` to `/v1/jobs/train` or `/v1/jobs/sample`): 202 and its id.
    pub fn submit(&self, path: &str, body: &Value) -> String {
        let r = self.post(path, body);
        assert_eq!(r.status, 202, "{}", String::from_utf8_lossy(&r.body));
        r.json()["id"].as_str().unwrap().to_string()
    }

    pub fn wait_finished(&self, id: &str) -> Value {
        let start = Instant::now();
        loop {
            let job = self.get(&format!("/v1/jobs/{id}")).json();
            if ["finished", "failed", "cancelled"].contains(&job["state"].as_str().unwrap_or("")) {
                return job;
            }
            assert!(
                start.elapsed() < Duration::from_secs(120),
                "job {id} stuck: {job}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// A connection with a small receive buffer, so a client that does not read backs
/// the server up soon.
pub fn small_buffer_stream(addr: SocketAddr) -> TcpStream {
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    socket.connect(&addr.into()).unwrap();
    socket.into()
}

/// A WebSocket client of `path_and_query` (`/v1/ws`, `/ws?clientId=…`) over a
/// [`small_buffer_stream`] that completes the handshake and then never reads.
pub fn silent_ws_client(addr: SocketAddr, path_and_query: &str) -> TcpStream {
    let mut stream = small_buffer_stream(addr);
    write!(
        stream,
        "GET {path_and_query} HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    .unwrap();
    let mut head = vec![];
    let mut byte = [0u8];
    while !head.ends_with(b"\r\n\r\n") {
        stream.read_exact(&mut byte).unwrap();
        head.push(byte[0]);
    }
    assert!(
        head.starts_with(b"HTTP/1.1 101"),
        "{}",
        String::from_utf8_lossy(&head)
    );
    stream
}

/// A WebSocket frame as a client sees it.
pub enum Frame {
    Event(Value),
    Preview(Vec<u8>),
}

pub fn next_frame(ws: &mut Ws) -> Frame {
    loop {
        match ws.read().expect("a frame") {
            Message::Text(t) => return Frame::Event(serde_json::from_str(t.as_str()).unwrap()),
            Message::Binary(b) => return Frame::Preview(b.to_vec()),
            _ => {} // pings are answered by tungstenite
        }
    }
}

/// Text events up to and including the first for which `last` holds.
pub fn events_until(ws: &mut Ws, last: impl Fn(&Value) -> bool) -> Vec<Value> {
    frames_until(ws, last).0
}

/// Text events up to and including the first for which `last` holds, and the
/// decoded previews that came with them.
pub fn frames_until(ws: &mut Ws, last: impl Fn(&Value) -> bool) -> (Vec<Value>, Vec<Preview>) {
    let (mut events, mut previews) = (vec![], vec![]);
    loop {
        match next_frame(ws) {
            Frame::Preview(p) => previews.push(decode_preview(&p)),
            Frame::Event(e) => {
                let done = last(&e);
                events.push(e);
                if done {
                    return (events, previews);
                }
            }
        }
    }
}

pub fn is_end_of(job: &str) -> impl Fn(&Value) -> bool + '_ {
    move |e: &Value| {
        e["job"] == job
            && e["type"] == "state"
            && ["finished", "failed", "cancelled"]
                .contains(&e["data"]["state"].as_str().unwrap_or(""))
    }
}

/// (job id, step, image) of a binary preview frame.
pub type Preview = (String, u32, Vec<u8>);

/// A binary preview frame, decoded by its documented header.
fn decode_preview(frame: &[u8]) -> Preview {
    let u32_at = |i: usize| u32::from_be_bytes(frame[i..i + 4].try_into().unwrap());
    assert_eq!(u32_at(0), 1, "frame type preview");
    assert_eq!(u32_at(4), 2, "PNG");
    let n = u16::from_be_bytes([frame[20], frame[21]]) as usize;
    let job = String::from_utf8(frame[22..22 + n].to_vec()).unwrap();
    (job, u32_at(16), frame[22 + n..].to_vec())
}

fn dechunk(mut b: &[u8]) -> Vec<u8> {
    let mut out = vec![];
    loop {
        let Some(eol) = b.windows(2).position(|w| w == b"\r\n") else {
            return out;
        };
        let size =
            usize::from_str_radix(String::from_utf8_lossy(&b[..eol]).trim(), 16).unwrap_or(0);
        if size == 0 {
            return out;
        }
        out.extend_from_slice(&b[eol + 2..eol + 2 + size]);
        b = &b[eol + 2 + size + 2..];
    }
}

/// `fluxlora serve` as a child process on a free port, with its address.
pub fn spawn_process(data_dir: &Path, root: &Path) -> (std::process::Child, App) {
    // Nobody waits for the log lines; the reader still drains the pipe.
    start_serving(serve_command(data_dir, root), std::sync::mpsc::channel().0)
}

/// The command line of `fluxlora serve` on a free port, with its state in
/// `data_dir`, `root` as the folder requests may name, and info logs.
pub fn serve_command(data_dir: &Path, root: &Path) -> std::process::Command {
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_fluxlora"));
    command
        .args(["serve", "--port", "0", "--data-dir"])
        .arg(data_dir)
        .arg("--root")
        .arg(root)
        .env("RUST_LOG", "info");
    command
}

/// Starts `command` (a [`serve_command`]) and waits until it logs its address;
/// every line it logs to stderr, then and later, goes to `log`.
pub fn start_serving(
    mut command: std::process::Command,
    log: std::sync::mpsc::Sender<String>,
) -> (std::process::Child, App) {
    use std::io::BufRead;
    let mut child = command
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            if let Some(rest) = line.split("serving on http://").nth(1) {
                let addr = rest.split_whitespace().next().unwrap().to_string();
                let _ = tx.send(addr);
            }
            let _ = log.send(line);
        }
    });
    let addr = rx
        .recv_timeout(Duration::from_secs(60))
        .expect("serve logs its address")
        .parse()
        .unwrap();
    (child, App { addr, token: None })
}
