//! weir-relay: a seeded UDP impairment relay between devices and weir, for machines
//! whose kernel has no `netem`. Devices send to `--listen`; for each client address the
//! relay keeps a session with its own upstream socket towards `--to`, and sends weir's
//! replies back from `--listen`. Both directions are impaired by the same seeded
//! schedule (`weir_relay::Schedule`): loss, delay with jitter, reordering, duplication,
//! a link cut, and NAT rebinding (each session's upstream socket replaced by one on a
//! new port, as a NAT whose mapping expired would).
//!
//! This file is the shell: sockets, timers and signals. Every decision comes from the
//! pure schedule in `lib.rs`. It logs its listening address on stderr at start and
//! prints its counters as one JSON line on stdout when it stops (`--seconds`, SIGTERM
//! or SIGINT). Exit codes: 0 stopped cleanly, 1 a socket could not be opened, 2 bad
//! options.

#![deny(unsafe_code)]

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use tokio::net::UdpSocket;
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use weir_relay::{Counters, Cut, DelayQueue, Direction, Fate, FlowOrder, Impairments, Schedule};

/// The largest UDP payload.
const DATAGRAM_BYTES_MAX: usize = 65_535;
/// Datagrams from weir queued between the sessions' readers and the relay loop.
const FROM_SERVER_QUEUE_MAX: usize = 4096;
/// Send failures logged on stderr (all are counted).
const SEND_ERRORS_LOGGED_MAX: u64 = 8;
/// How often idle sessions are looked for.
const SWEEP_EVERY: Duration = Duration::from_secs(5);
/// The longest run, and the latest cut start and longest cut.
const SECONDS_MAX: f64 = 7.0 * 86_400.0;

#[derive(Debug, Parser)]
#[command(
    name = "weir-relay",
    version,
    about = "Seeded UDP impairment relay: loss, delay + jitter, reordering, duplication, link cuts, NAT rebinding",
    after_help = "Impairments apply to both directions. Counters are printed as one JSON line on stdout at exit:\n\
                  {\"forwarded\",\"dropped\",\"duplicated\",\"reordered\",\"cut_dropped\",\"rebinds\",...}"
)]
struct Options {
    /// Address devices send to (ip:port; port 0 picks one, logged on stderr).
    #[arg(long)]
    listen: SocketAddr,
    /// weir's QUIC address (ip:port).
    #[arg(long)]
    to: SocketAddr,
    /// Seed of the impairment schedule: the same seed gives the same decisions.
    #[arg(long)]
    seed: u64,
    /// Probability that a datagram is lost (0..=1).
    #[arg(long, default_value_t = 0.0)]
    loss: f64,
    /// One-way delay added to every datagram, in milliseconds.
    #[arg(long, default_value_t = 0)]
    delay_ms: u64,
    /// The delay varies uniformly within +-this many milliseconds (floored at 0).
    #[arg(long, default_value_t = 0)]
    jitter_ms: u64,
    /// Let jitter reorder datagrams, as netem does (by default each flow keeps its order
    /// through the jitter, and only --reorder reorders).
    #[arg(long)]
    jitter_reorders: bool,
    /// Probability that a datagram is held back --reorder-ms longer, so later ones overtake it.
    #[arg(long, default_value_t = 0.0)]
    reorder: f64,
    /// How much longer a reordered datagram is held, in milliseconds.
    #[arg(long, default_value_t = 30)]
    reorder_ms: u64,
    /// Probability that a datagram is sent twice.
    #[arg(long, default_value_t = 0.0)]
    duplicate: f64,
    /// Cut the link (drop everything, both ways) this many seconds after the start.
    #[arg(long, requires = "cut_for_s")]
    cut_at_s: Option<f64>,
    /// How long the cut lasts, in seconds.
    #[arg(long, requires = "cut_at_s")]
    cut_for_s: Option<f64>,
    /// Replace every session's upstream socket by one on a new port this often (NAT rebinding).
    #[arg(long)]
    rebind_every_s: Option<f64>,
    /// Stop after this many seconds (default: run until SIGTERM or SIGINT).
    #[arg(long)]
    seconds: Option<f64>,
    /// Most client addresses relayed at once; datagrams from more are dropped and counted.
    #[arg(long, default_value_t = 1024)]
    sessions_max: usize,
    /// Most datagrams held for their delay at once; more are dropped and counted.
    #[arg(long, default_value_t = 65_536)]
    queued_datagrams_max: usize,
    /// Most bytes held for their delay at once; more are dropped and counted.
    #[arg(long, default_value_t = 64 << 20)]
    queued_bytes_max: usize,
    /// A session with no datagram either way for this many seconds is closed.
    #[arg(long, default_value_t = 120)]
    session_idle_s: u64,
}

fn seconds(name: &str, value: f64, problems: &mut Vec<String>) -> Duration {
    if !value.is_finite() || !(0.0..=SECONDS_MAX).contains(&value) {
        problems.push(format!("--{name} {value} is not in 0..={SECONDS_MAX}"));
        return Duration::ZERO;
    }
    Duration::from_secs_f64(value)
}

/// The checked options: impairments, end of run, limits; or every problem found.
fn check(options: &Options) -> Result<(Impairments, Option<Duration>), Vec<String>> {
    let mut problems = Vec::new();
    let cut = match (options.cut_at_s, options.cut_for_s) {
        (Some(at), Some(length)) => Some(Cut {
            at: seconds("cut-at-s", at, &mut problems),
            length: seconds("cut-for-s", length, &mut problems),
        }),
        _ => None,
    };
    let rebind_every = options.rebind_every_s.map(|every| seconds("rebind-every-s", every, &mut problems));
    let run_for = options.seconds.map(|run| seconds("seconds", run, &mut problems));
    if run_for.is_some_and(|run| run.is_zero()) {
        problems.push("--seconds must be above 0".into());
    }
    let impairments = Impairments {
        loss: options.loss,
        delay: Duration::from_millis(options.delay_ms),
        jitter: Duration::from_millis(options.jitter_ms),
        reorder: options.reorder,
        reorder_hold: Duration::from_millis(options.reorder_ms),
        duplicate: options.duplicate,
        cut,
        rebind_every,
    };
    problems.extend(impairments.problems());
    if options.sessions_max == 0 || options.queued_datagrams_max == 0 || options.queued_bytes_max == 0 {
        problems.push("--sessions-max, --queued-datagrams-max and --queued-bytes-max must be at least 1".into());
    }
    if options.session_idle_s == 0 {
        problems.push("--session-idle-s must be at least 1".into());
    }
    if options.to.port() == 0 || options.to.ip().is_unspecified() {
        problems.push(format!("--to {} is not an address to send to", options.to));
    }
    if problems.is_empty() {
        Ok((impairments, run_for))
    } else {
        Err(problems)
    }
}

/// A client's session: its own upstream socket towards weir (replaced on rebinding)
/// and the task that reads weir's replies from it.
struct Session {
    id: u64,
    client: SocketAddr,
    socket: Arc<UdpSocket>,
    reader: JoinHandle<()>,
    last_active: Instant,
    /// The order of the session's datagrams towards weir and back (see `FlowOrder`).
    to_server: FlowOrder,
    to_client: FlowOrder,
}

impl Drop for Session {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

enum Target {
    /// Towards weir, through the session's upstream socket at the time of sending (so
    /// datagrams held across a rebind leave from the new port, as through a NAT).
    Server {
        session: u64,
    },
    Client(SocketAddr),
}

struct Held {
    target: Target,
    bytes: Vec<u8>,
}

/// The address upstream sockets bind to: loopback towards a loopback weir.
fn upstream_bind(to: SocketAddr) -> SocketAddr {
    let ip: IpAddr = match (to.ip(), to.ip().is_loopback()) {
        (IpAddr::V4(_), true) => Ipv4Addr::LOCALHOST.into(),
        (IpAddr::V4(_), false) => Ipv4Addr::UNSPECIFIED.into(),
        (IpAddr::V6(_), true) => Ipv6Addr::LOCALHOST.into(),
        (IpAddr::V6(_), false) => Ipv6Addr::UNSPECIFIED.into(),
    };
    SocketAddr::new(ip, 0)
}

async fn upstream_socket(to: SocketAddr) -> std::io::Result<UdpSocket> {
    let socket = UdpSocket::bind(upstream_bind(to)).await?;
    socket.connect(to).await?;
    Ok(socket)
}

/// Reads weir's replies on one upstream socket until the session or the relay ends.
async fn read_from_server(socket: Arc<UdpSocket>, session: u64, replies: mpsc::Sender<(u64, Vec<u8>)>) {
    let mut buffer = vec![0u8; DATAGRAM_BYTES_MAX];
    loop {
        match socket.recv(&mut buffer).await {
            Ok(length) => {
                if replies.send((session, buffer[..length].to_vec())).await.is_err() {
                    return;
                }
            }
            // A connected UDP socket reports an earlier send's ICMP error here (weir not
            // listening yet, say); the socket is still good.
            Err(_) => tokio::time::sleep(Duration::from_millis(1)).await,
        }
    }
}

struct Relay {
    listen: Arc<UdpSocket>,
    to: SocketAddr,
    schedule: Schedule,
    queue: DelayQueue<Held>,
    sessions: HashMap<SocketAddr, Session>,
    clients: HashMap<u64, SocketAddr>,
    session_next: u64,
    sessions_max: usize,
    session_idle: Duration,
    jitter_reorders: bool,
    replies: mpsc::Sender<(u64, Vec<u8>)>,
    counters: Counters,
    start: Instant,
}

impl Relay {
    async fn open_session(&mut self, client: SocketAddr) -> Option<u64> {
        if let Some(session) = self.sessions.get_mut(&client) {
            session.last_active = Instant::now();
            return Some(session.id);
        }
        if self.sessions.len() >= self.sessions_max {
            self.counters.sessions_refused += 1;
            return None;
        }
        let socket = match upstream_socket(self.to).await {
            Ok(socket) => Arc::new(socket),
            Err(error) => {
                eprintln!("weir-relay: cannot open an upstream socket for {client}: {error}");
                self.counters.send_errors += 1;
                return None;
            }
        };
        let id = self.session_next;
        self.session_next += 1;
        let reader = tokio::spawn(read_from_server(socket.clone(), id, self.replies.clone()));
        let session = Session {
            id,
            client,
            socket,
            reader,
            last_active: Instant::now(),
            to_server: FlowOrder::default(),
            to_client: FlowOrder::default(),
        };
        self.sessions.insert(client, session);
        self.clients.insert(id, client);
        self.counters.sessions += 1;
        Some(id)
    }

    /// NAT rebinding: every session moves to a new upstream socket (a new source port).
    async fn rebind_all(&mut self) {
        let clients: Vec<SocketAddr> = self.sessions.keys().copied().collect();
        for client in clients {
            let socket = match upstream_socket(self.to).await {
                Ok(socket) => Arc::new(socket),
                Err(error) => {
                    eprintln!("weir-relay: rebinding {client}: {error}");
                    self.counters.send_errors += 1;
                    continue;
                }
            };
            let session = self.sessions.get_mut(&client).expect("listed above");
            let reader = tokio::spawn(read_from_server(socket.clone(), session.id, self.replies.clone()));
            session.reader.abort();
            session.reader = reader;
            session.socket = socket; // the old socket closes with its aborted reader
            self.counters.rebinds += 1;
        }
    }

    fn sweep_idle(&mut self) {
        let idle = self.session_idle;
        let clients = &mut self.clients;
        self.sessions.retain(|_, session| {
            let keep = session.last_active.elapsed() < idle;
            if !keep {
                clients.remove(&session.id);
            }
            keep
        });
    }

    fn since_start(&self) -> Duration {
        self.start.elapsed()
    }

    /// Applies the schedule to one datagram of `client`'s session: drop it, send it now,
    /// or hold it.
    async fn impair(&mut self, client: SocketAddr, direction: Direction, target: Target, bytes: Vec<u8>) {
        let now = self.since_start();
        match self.schedule.decide(direction, now) {
            Fate::CutDropped => self.counters.cut_dropped += 1,
            Fate::Dropped => self.counters.dropped += 1,
            Fate::Forward { delay, duplicate, reordered } => {
                self.counters.reordered += u64::from(reordered);
                self.counters.duplicated += u64::from(duplicate);
                let due = match self.sessions.get_mut(&client) {
                    Some(_) if self.jitter_reorders => now + delay,
                    Some(session) => match direction {
                        Direction::ToServer => session.to_server.due(now, delay, reordered),
                        Direction::ToClient => session.to_client.due(now, delay, reordered),
                    },
                    None => return, // closed meanwhile
                };
                if due <= now {
                    self.release_due().await; // what is due goes first, so nothing overtakes it
                }
                let copy = duplicate.then(|| Held { target: target.copy(), bytes: bytes.clone() });
                for held in std::iter::once(Held { target, bytes }).chain(copy) {
                    if due <= now {
                        self.send(held).await;
                    } else {
                        let length = held.bytes.len();
                        if self.queue.push(due, length, held).is_err() {
                            self.counters.queue_dropped += 1;
                        }
                    }
                }
            }
        }
    }

    /// Sends one datagram now. Awaiting the socket (rather than `try_send`, which
    /// fails on a new socket whose readiness tokio has not seen yet) costs nothing on
    /// loopback and waits only while the kernel's send buffer is full.
    async fn send(&mut self, held: Held) {
        let sent = match held.target {
            Target::Client(client) => self.listen.send_to(&held.bytes, client).await,
            Target::Server { session } => {
                let Some(session) = self.clients.get(&session).and_then(|client| self.sessions.get(client)) else {
                    return; // the session closed while this was held
                };
                let socket = session.socket.clone();
                socket.send(&held.bytes).await
            }
        };
        match sent {
            Ok(_) => self.counters.forwarded += 1,
            Err(error) => {
                self.counters.send_errors += 1;
                if self.counters.send_errors <= SEND_ERRORS_LOGGED_MAX {
                    eprintln!("weir-relay: send failed ({error}); counted in send_errors");
                }
            }
        }
    }

    async fn release_due(&mut self) {
        let now = self.since_start();
        while let Some(held) = self.queue.pop_due(now) {
            self.send(held).await;
        }
    }
}

impl Target {
    fn copy(&self) -> Target {
        match self {
            Target::Server { session } => Target::Server { session: *session },
            Target::Client(client) => Target::Client(*client),
        }
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

async fn run(options: Options, impairments: Impairments, run_for: Option<Duration>) -> Result<(), String> {
    let listen = UdpSocket::bind(options.listen)
        .await
        .map_err(|error| format!("cannot listen on {}: {error}", options.listen))?;
    let local = listen.local_addr().map_err(|error| format!("cannot read the listening address: {error}"))?;
    let mut terminate = signal(SignalKind::terminate()).map_err(|error| format!("SIGTERM handler: {error}"))?;
    let mut interrupt = signal(SignalKind::interrupt()).map_err(|error| format!("SIGINT handler: {error}"))?;
    eprintln!("weir-relay: listening on {local}, relaying to {}, seed {}, {impairments:?}", options.to, options.seed);
    let (replies, mut from_server) = mpsc::channel(FROM_SERVER_QUEUE_MAX);
    let start = Instant::now();
    let mut relay = Relay {
        listen: Arc::new(listen),
        to: options.to,
        schedule: Schedule::new(impairments, options.seed),
        queue: DelayQueue::new(options.queued_datagrams_max, options.queued_bytes_max),
        sessions: HashMap::new(),
        clients: HashMap::new(),
        session_next: 0,
        sessions_max: options.sessions_max,
        session_idle: Duration::from_secs(options.session_idle_s),
        jitter_reorders: options.jitter_reorders,
        replies,
        counters: Counters::default(),
        start,
    };
    let end = run_for.map(|run| start + run);
    let mut rebind_epoch = 0u64;
    let mut next_sweep = start + SWEEP_EVERY;
    let mut buffer = vec![0u8; DATAGRAM_BYTES_MAX];
    let listen = relay.listen.clone();
    loop {
        relay.release_due().await;
        let due_epoch = relay.schedule.rebind_epoch(relay.since_start());
        if due_epoch > rebind_epoch {
            rebind_epoch = due_epoch;
            relay.rebind_all().await;
        }
        if Instant::now() >= next_sweep {
            relay.sweep_idle();
            next_sweep = Instant::now() + SWEEP_EVERY;
        }
        let mut wake = next_sweep;
        if let Some(due) = relay.queue.next_due() {
            wake = wake.min(start + due);
        }
        if let Some(rebind) = relay.schedule.rebind_at(rebind_epoch + 1) {
            wake = wake.min(start + rebind);
        }
        tokio::select! {
            biased;
            _ = terminate.recv() => break,
            _ = interrupt.recv() => break,
            () = sleep_until(end) => break,
            () = tokio::time::sleep_until(wake) => {}
            received = listen.recv_from(&mut buffer) => {
                let Ok((length, client)) = received else { continue };
                relay.counters.received_from_clients += 1;
                if let Some(session) = relay.open_session(client).await {
                    relay.impair(client, Direction::ToServer, Target::Server { session }, buffer[..length].to_vec()).await;
                }
            }
            Some((session, bytes)) = from_server.recv() => {
                relay.counters.received_from_server += 1;
                let Some(&client) = relay.clients.get(&session) else { continue };
                if let Some(found) = relay.sessions.get_mut(&client) {
                    found.last_active = Instant::now();
                }
                relay.impair(client, Direction::ToClient, Target::Client(client), bytes).await;
            }
        }
    }
    let elapsed = start.elapsed().as_secs_f64();
    println!("{}", relay.counters.json(options.seed, elapsed));
    debug_assert!(relay.sessions.values().all(|session| relay.clients.get(&session.id) == Some(&session.client)));
    Ok(())
}

fn main() -> ExitCode {
    let options = Options::parse(); // clap reports its own errors with exit code 2
    let (impairments, run_for) = match check(&options) {
        Ok(checked) => checked,
        Err(problems) => {
            for problem in problems {
                eprintln!("weir-relay: {problem}");
            }
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("weir-relay: cannot start the runtime: {error}");
            return ExitCode::from(1);
        }
    };
    match runtime.block_on(run(options, impairments, run_for)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("weir-relay: {error}");
            ExitCode::from(1)
        }
    }
}
