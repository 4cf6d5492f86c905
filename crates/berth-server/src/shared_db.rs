//! A PostgreSQL database shared by several berth processes (`BERTH_DATABASE_URL`): the connection
//! that the shared accounts and the shared deployments each hold.
//!
//! The `postgres` client blocks and runs its own runtime, which must not run on the server's async
//! threads: one thread owns the connection (reconnecting when it drops) and runs each call sent to
//! it, and a caller waits at most [`CALL_LIMIT`] for its answer. Messages name the server and the
//! database, never the password. Connections are plain TCP or a Unix socket: keep the database on a
//! private network.

use std::sync::mpsc;
use std::time::Duration;

use postgres::config::Host;
use postgres::{Client, Config, NoTls, Transaction};

/// How long a call waits for the database before it gives up: a hung database must not hang the
/// requests that need it.
pub const CALL_LIMIT: Duration = Duration::from_secs(10);

/// The database's clock in Unix milliseconds: processes whose clocks disagree still agree on it.
pub const NOW_MS: &str = "(extract(epoch from clock_timestamp()) * 1000)::bigint";

type Job = Box<dyn FnOnce(&mut Link) + Send>;

/// Why a call to the shared database failed, with where it is (never the password).
#[derive(Debug, thiserror::Error)]
#[error("cannot use the shared database {place}: {reason}")]
pub struct SharedDbError {
    pub place: String,
    pub reason: String,
}

pub struct SharedDb {
    /// The server and database, for messages (never the password).
    place: String,
    jobs: mpsc::Sender<Job>,
}

/// The connection, owned by the database's thread.
struct Link {
    config: Config,
    client: Option<Client>,
}

impl Link {
    fn client(&mut self) -> Result<&mut Client, postgres::Error> {
        if let Some(client) = self.client.take().filter(|c| !c.is_closed()) {
            return Ok(self.client.insert(client));
        }
        let mut client = self.config.connect(NoTls)?;
        // A statement or lock wait that takes this long is a database in trouble: fail the call
        // (and the request that made it) rather than queue every later call behind it.
        client.batch_execute("SET statement_timeout = '5s'; SET lock_timeout = '5s'")?;
        Ok(self.client.insert(client))
    }
}

/// What went wrong, in words: the server's own message for a database error, else the error and
/// its causes (the client's `Display` alone says only "db error").
fn reason(e: &postgres::Error) -> String {
    if let Some(db) = e.as_db_error() {
        return format!("{}: {}", db.severity(), db.message());
    }
    let mut text = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(cause) = source {
        text.push_str(&format!(": {cause}"));
        source = cause.source();
    }
    text
}

/// `user@host:port/database`, for messages.
fn describe(config: &Config) -> String {
    let hosts: Vec<String> = config
        .get_hosts()
        .iter()
        .enumerate()
        .map(|(i, h)| {
            let port = config.get_ports().get(i).or(config.get_ports().first()).copied().unwrap_or(5432);
            match h {
                Host::Tcp(name) => format!("{name}:{port}"),
                Host::Unix(dir) => format!("{}/.s.PGSQL.{port}", dir.display()),
            }
        })
        .collect();
    let user = config.get_user().map(|u| format!("{u}@")).unwrap_or_default();
    let db = config.get_dbname().or(config.get_user()).unwrap_or("postgres");
    format!("postgres://{user}{}/{db}", hosts.join(","))
}

impl SharedDb {
    /// Connect to the database `url` names (a `postgres://` URL or `key=value` pairs) and run
    /// `schema` (statements that make what is missing) in one transaction.
    pub fn open(url: &str, schema: &'static str) -> Result<SharedDb, SharedDbError> {
        let mut config: Config = url.parse().map_err(|_| SharedDbError {
            place: "BERTH_DATABASE_URL".into(),
            reason: "it is not a PostgreSQL connection string: write postgres://USER:PASSWORD@HOST:PORT/DATABASE \
                     or host=/run/postgresql dbname=berth"
                .into(),
        })?;
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(Duration::from_secs(5));
        }
        config.application_name("berth");
        let place = describe(&config);
        let (jobs, queue) = mpsc::channel::<Job>();
        std::thread::Builder::new()
            .name("berth-shared-db".into())
            .spawn(move || {
                let mut link = Link { config, client: None };
                while let Ok(job) = queue.recv() {
                    job(&mut link);
                }
            })
            .map_err(|e| SharedDbError { place: place.clone(), reason: format!("cannot start a thread: {e}") })?;
        let db = SharedDb { place, jobs };
        db.transaction(move |tx| tx.batch_execute(schema))?;
        Ok(db)
    }

    pub fn place(&self) -> &str {
        &self.place
    }

    fn failed(&self, reason: String) -> SharedDbError {
        SharedDbError { place: self.place.clone(), reason }
    }

    /// Run `f` on the connection, on the database's thread; wait at most [`CALL_LIMIT`].
    pub fn call<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Client) -> Result<T, postgres::Error> + Send + 'static,
    ) -> Result<T, SharedDbError> {
        let (answer, answered) = mpsc::sync_channel(1);
        let job: Job = Box::new(move |link| {
            let _ = answer.send(link.client().and_then(f));
        });
        self.jobs.send(job).map_err(|_| self.failed("its connection thread has stopped".into()))?;
        match answered.recv_timeout(CALL_LIMIT) {
            Ok(result) => result.map_err(|e| self.failed(reason(&e))),
            Err(_) => Err(self.failed(format!("no answer within {} s", CALL_LIMIT.as_secs()))),
        }
    }

    /// Run `f` in a transaction, committed when it returns Ok.
    pub fn transaction<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Transaction<'_>) -> Result<T, postgres::Error> + Send + 'static,
    ) -> Result<T, SharedDbError> {
        self.call(|c| {
            let mut tx = c.transaction()?;
            let out = f(&mut tx)?;
            tx.commit()?;
            Ok(out)
        })
    }
}
