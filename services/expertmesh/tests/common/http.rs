//! Talking to a gateway from tests: its flags, raw HTTP/1.1 exchanges, SSE bodies.

use serde_json::Value;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;

pub const VOCAB: &str = "129280";

pub fn tokenizer_path() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../../shared/data/tokenizer-deepseek-v3/tokenizer.json")
}

/// `expertmesh gateway` flags: the real tokenizer, free ports, this etcd (and key prefix).
pub fn gateway_flags(tokenizer: &std::path::Path, etcd: &str, prefix: &str) -> Vec<String> {
    let tok = tokenizer.to_str().unwrap();
    [
        "--tokenizer",
        tok,
        "--http-listen",
        "127.0.0.1:0",
        "--grpc-listen",
        "127.0.0.1:0",
        "--etcd",
        etcd,
        "--etcd-prefix",
        prefix,
    ]
    .map(String::from)
    .to_vec()
}

/// A raw HTTP/1.1 exchange (`Connection: close`): status and de-chunked body.
pub struct Http {
    pub status: u16,
    /// The response's header lines, as sent.
    pub head: String,
    pub body: String,
}

pub fn dechunk(raw: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut rest = raw;
    loop {
        let Some(eol) = rest.windows(2).position(|w| w == b"\r\n") else { return out };
        let size = usize::from_str_radix(std::str::from_utf8(&rest[..eol]).unwrap().trim(), 16).unwrap_or(0);
        if size == 0 {
            return out;
        }
        out.extend_from_slice(&rest[eol + 2..eol + 2 + size]);
        rest = &rest[eol + 2 + size + 2..];
    }
}

pub fn send(url: &str, method: &str, path: &str, body: &str, headers: &[(&str, &str)]) -> TcpStream {
    let addr = url.trim_start_matches("http://");
    let mut s = TcpStream::connect(addr).unwrap();
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        req += &format!("{k}: {v}\r\n");
    }
    req += "\r\n";
    req += body;
    s.write_all(req.as_bytes()).unwrap();
    s
}

pub fn finish(mut raw: Vec<u8>, mut s: TcpStream) -> Http {
    s.read_to_end(&mut raw).unwrap();
    let split = raw.windows(4).position(|w| w == b"\r\n\r\n").unwrap();
    let head = String::from_utf8_lossy(&raw[..split]).to_string();
    let status = head.split_whitespace().nth(1).unwrap().parse().unwrap();
    let body = if head.to_ascii_lowercase().contains("transfer-encoding: chunked") {
        dechunk(&raw[split + 4..])
    } else {
        raw[split + 4..].to_vec()
    };
    Http { status, head, body: String::from_utf8(body).unwrap() }
}

pub fn post(url: &str, path: &str, body: &Value, headers: &[(&str, &str)]) -> Http {
    finish(Vec::new(), send(url, "POST", path, &body.to_string(), headers))
}

impl Http {
    /// A header's value (names compare case-insensitively).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.head.lines().find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.trim().eq_ignore_ascii_case(name).then(|| v.trim())
        })
    }
}

pub fn get(url: &str, path: &str) -> Http {
    finish(Vec::new(), send(url, "GET", path, "", &[]))
}

/// The `data:` events of an SSE body, up to `[DONE]` (which must be last).
pub fn events(body: &str) -> Vec<Value> {
    let data: Vec<&str> = body.split("\n\n").filter_map(|e| e.strip_prefix("data: ")).collect();
    assert_eq!(data.last(), Some(&"[DONE]"), "stream ends with [DONE]: {body}");
    data[..data.len() - 1].iter().map(|d| serde_json::from_str(d).unwrap()).collect()
}
