//! A TCP proxy the test controls, to cut a link on loopback without root or the
//! kernel's help (no netem, no firewall rules that would touch other tests): it
//! forwards every connection it accepts to its target until [`Proxy::cut`], which
//! closes the connections it carries and refuses new ones (accepted and closed at
//! once) until [`Proxy::heal`].

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

/// A running proxy; stops when dropped.
#[derive(Debug)]
pub struct Proxy {
    /// The port it listens on, on 127.0.0.1.
    pub port: u16,
    state: Arc<State>,
    accept: JoinHandle<()>,
}

#[derive(Debug, Default)]
struct State {
    cut: AtomicBool,
    /// The tasks carrying open connections.
    carrying: Mutex<Vec<JoinHandle<()>>>,
}

impl Proxy {
    /// Listens on a free port of 127.0.0.1 and forwards to 127.0.0.1:`target`.
    pub async fn start(target: u16) -> Proxy {
        let listener = TcpListener::bind(("127.0.0.1", 0))
            .await
            .expect("a port for the proxy");
        let port = listener.local_addr().expect("its address").port();
        let state = Arc::new(State::default());
        let accept = tokio::spawn({
            let state = Arc::clone(&state);
            async move {
                loop {
                    let Ok((mut inbound, _)) = listener.accept().await else {
                        continue;
                    };
                    // Under the lock: a cut either sees this connection or came first.
                    let mut carrying = state.carrying.lock().expect("the proxy's connections");
                    if state.cut.load(Ordering::SeqCst) {
                        drop(inbound);
                        continue;
                    }
                    let carry = tokio::spawn(async move {
                        if let Ok(mut outbound) = TcpStream::connect(("127.0.0.1", target)).await {
                            let _ =
                                tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                        }
                    });
                    carrying.retain(|task| !task.is_finished());
                    carrying.push(carry);
                }
            }
        });
        Proxy {
            port,
            state,
            accept,
        }
    }

    /// Closes every connection it carries and refuses new ones.
    pub fn cut(&self) {
        self.state.cut.store(true, Ordering::SeqCst);
        let carrying =
            std::mem::take(&mut *self.state.carrying.lock().expect("the proxy's connections"));
        // Aborting a task drops both of its sockets: each side sees its connection close.
        for task in carrying {
            task.abort();
        }
    }

    /// Forwards again.
    pub fn heal(&self) {
        self.state.cut.store(false, Ordering::SeqCst);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.accept.abort();
        self.cut();
    }
}
