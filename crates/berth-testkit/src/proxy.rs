//! A TCP proxy on loopback that forwards bytes both ways and can cut every connection once a budget
//! of bytes has gone from the server to the client: how a test kills a download mid-blob.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread;

pub struct CutProxy {
    pub port: u16,
    state: Arc<State>,
}

struct State {
    /// Bytes forwarded from the server to clients, over all connections.
    downstream: AtomicU64,
    /// Cut once `downstream` passes this (u64::MAX: never).
    cut_after: AtomicU64,
    stop: AtomicBool,
}

impl CutProxy {
    /// Forward 127.0.0.1:<new port> to 127.0.0.1:`upstream`.
    pub fn start(upstream: u16) -> CutProxy {
        let listener = TcpListener::bind("127.0.0.1:0").expect("proxy listen");
        let port = listener.local_addr().expect("proxy addr").port();
        let state = Arc::new(State {
            downstream: AtomicU64::new(0),
            cut_after: AtomicU64::new(u64::MAX),
            stop: AtomicBool::new(false),
        });
        let st = state.clone();
        thread::spawn(move || {
            for client in listener.incoming() {
                if st.stop.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(client) = client else { continue };
                let Ok(server) = TcpStream::connect(("127.0.0.1", upstream)) else {
                    continue;
                };
                let st = st.clone();
                thread::spawn(move || pipe_pair(client, server, st));
            }
        });
        CutProxy { port, state }
    }

    /// Cut connections once `bytes` more have gone downstream.
    pub fn cut_after(&self, bytes: u64) {
        let now = self.state.downstream.load(Ordering::SeqCst);
        self.state.cut_after.store(now.saturating_add(bytes), Ordering::SeqCst);
    }

    /// Forward without limit.
    pub fn pass_through(&self) {
        self.state.cut_after.store(u64::MAX, Ordering::SeqCst);
    }

    /// Bytes forwarded from the server so far.
    pub fn downstream_bytes(&self) -> u64 {
        self.state.downstream.load(Ordering::SeqCst)
    }
}

impl Drop for CutProxy {
    fn drop(&mut self) {
        self.state.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(("127.0.0.1", self.port));
    }
}

fn pipe_pair(client: TcpStream, server: TcpStream, st: Arc<State>) {
    let (Ok(mut c2), Ok(mut s2)) = (client.try_clone(), server.try_clone()) else {
        return;
    };
    let up = thread::spawn(move || {
        let mut client = client;
        let mut server = server;
        let _ = std::io::copy(&mut client, &mut server);
        let _ = server.shutdown(Shutdown::Write);
    });
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match s2.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let before = st.downstream.fetch_add(n as u64, Ordering::SeqCst);
        let limit = st.cut_after.load(Ordering::SeqCst);
        let allowed = limit.saturating_sub(before).min(n as u64) as usize;
        if c2.write_all(&buf[..allowed]).is_err() || allowed < n {
            break;
        }
    }
    let _ = c2.shutdown(Shutdown::Both);
    let _ = s2.shutdown(Shutdown::Both);
    let _ = up.join();
}
