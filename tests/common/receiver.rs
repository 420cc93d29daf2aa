//! A tiny HTTP webhook receiver on 127.0.0.1 that answers per a script.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

/// One request the receiver got.
#[derive(Clone, Debug)]
pub struct Got {
    /// The request's path (and query).
    pub path: String,
    pub headers: HashMap<String, String>,
    pub body: Vec<u8>,
    pub at: Instant,
}

pub type Script = Arc<dyn Fn(usize, &Got) -> (u16, Vec<(String, String)>) + Send + Sync>;

/// A tiny HTTP receiver that answers per a script (request number from 0).
pub struct Receiver {
    pub url: String,
    got: Arc<Mutex<Vec<Got>>>,
    _server: Arc<tiny_http::Server>,
}

impl Receiver {
    pub fn start(script: Script) -> Receiver {
        let server = Arc::new(tiny_http::Server::http("127.0.0.1:0").unwrap());
        let port = server.server_addr().to_ip().unwrap().port();
        let got = Arc::new(Mutex::new(Vec::new()));
        let count = Arc::new(AtomicUsize::new(0));
        for _ in 0..4 {
            let (server, got, count, script) =
                (server.clone(), got.clone(), count.clone(), script.clone());
            std::thread::spawn(move || {
                while let Ok(mut req) = server.recv() {
                    let mut body = Vec::new();
                    std::io::Read::read_to_end(req.as_reader(), &mut body).unwrap();
                    let headers = super::headers(&req);
                    let g = Got {
                        path: req.url().to_owned(),
                        headers,
                        body,
                        at: Instant::now(),
                    };
                    let n = count.fetch_add(1, Ordering::SeqCst);
                    let (status, extra) = script(n, &g);
                    got.lock().unwrap().push(g);
                    let mut resp = tiny_http::Response::from_string(format!("answer {n}"))
                        .with_status_code(status);
                    for (k, v) in extra {
                        resp.add_header(
                            tiny_http::Header::from_bytes(k.as_bytes(), v.as_bytes()).unwrap(),
                        );
                    }
                    let _ = req.respond(resp);
                }
            });
        }
        Receiver {
            url: format!("http://127.0.0.1:{port}/hook"),
            got,
            _server: server,
        }
    }

    pub fn ok() -> Receiver {
        Receiver::start(Arc::new(|_, _| (200, vec![])))
    }

    pub fn got(&self) -> Vec<Got> {
        self.got.lock().unwrap().clone()
    }
}
