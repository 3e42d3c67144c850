//! The console's settings (`COOKIE_SECURE`, session lifetimes, the sign-in
//! throttle) and the sign-in policy they make, apart from the console's
//! handlers so that the API's state can hold the policy.

use imgflow_platform::config::HumanDuration;

/// The console's settings; each flag also reads the environment variable
/// of the same name.
#[derive(Debug, Clone, clap::Args)]
pub struct ConsoleSettings {
    /// Whether the session cookie is marked `Secure` (sent only over
    /// HTTPS): set it when the console is reached through a TLS proxy. No
    /// request header decides it.
    #[arg(long, env = "COOKIE_SECURE", default_value_t = false, action = clap::ArgAction::Set)]
    pub cookie_secure: bool,
    /// A console session unused for this long ends.
    #[arg(long, env = "CONSOLE_SESSION_IDLE", default_value = "30m")]
    pub console_session_idle: HumanDuration,
    /// A console session ends this long after it started, however much it
    /// is used.
    #[arg(long, env = "CONSOLE_SESSION_LIFETIME", default_value = "12h")]
    pub console_session_lifetime: HumanDuration,
    /// Failed sign-ins from one address (an IPv6 /64) after which it is
    /// refused (429) until its window ends.
    #[arg(long, env = "SIGN_IN_MAX_FAILURES", default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..))]
    pub sign_in_max_failures: u64,
    /// The window failed sign-ins are counted in, from an address's first
    /// failure.
    #[arg(long, env = "SIGN_IN_FAILURE_WINDOW", default_value = "15m")]
    pub sign_in_failure_window: HumanDuration,
}

/// How sign-ins are limited, and how the cookie is marked.
#[derive(Debug, Clone, Copy)]
pub struct SignInPolicy {
    /// `SIGN_IN_MAX_FAILURES`.
    pub max_failures: u64,
    /// `SIGN_IN_FAILURE_WINDOW`.
    pub failure_window: std::time::Duration,
    /// `COOKIE_SECURE`.
    pub cookie_secure: bool,
}

impl ConsoleSettings {
    /// The sign-in policy these settings make.
    pub fn policy(&self) -> SignInPolicy {
        SignInPolicy {
            max_failures: self.sign_in_max_failures,
            failure_window: self
                .sign_in_failure_window
                .0
                .max(std::time::Duration::from_secs(1)),
            cookie_secure: self.cookie_secure,
        }
    }
}
