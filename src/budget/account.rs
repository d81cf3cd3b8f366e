//! Whose windows a budget operation counts against: an [`Account`], of one
//! of the [`AccountKind`]s. Each kind renders to storage keys of its own, so
//! an upstream's pacing can never be read, labelled or reported as a client.
//!
//! The keys are what the stores have always held (SQLite rows, Redis keys):
//! a client's key is its bare name, and every other kind's starts with a
//! control character, which no client name may hold (the config and the
//! admin API refuse one).

use std::fmt;
use std::sync::Arc;

/// A kind of budget account.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum AccountKind {
    /// A client's budget (`[clients.budget]`, or a managed client's).
    Client,
    /// An upstream's pacing limits (`upstreams[].requests_per_minute`,
    /// `tokens_per_minute`, `max_concurrent`): reserved and
    /// settled like a client's, never reported as a client's usage.
    Upstream,
    /// A team's budget (`[[teams]]`, or a managed team's): reserved together
    /// with each of its clients' windows, all or nothing.
    Team,
}

impl AccountKind {
    pub const ALL: [AccountKind; 3] = [
        AccountKind::Client,
        AccountKind::Upstream,
        AccountKind::Team,
    ];

    /// The kind's name in logs.
    pub fn label(self) -> &'static str {
        match self {
            AccountKind::Client => "client",
            AccountKind::Upstream => "upstream",
            AccountKind::Team => "team",
        }
    }

    /// What the storage keys of this kind start with.
    fn key_prefix(self) -> &'static str {
        match self {
            // Bare names: clients were the only kind when the stores began.
            AccountKind::Client => "",
            AccountKind::Upstream => "\u{1}upstream/",
            AccountKind::Team => "\u{1}team/",
        }
    }
}

/// One account: a kind and a name, held as its storage key so that every
/// store operation reads it without building it again.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Account {
    kind: AccountKind,
    /// The kind's prefix, then the name.
    key: Arc<str>,
    /// The team a client's windows are kept beside: in a Redis Cluster, one
    /// script reserves against a client and its team together, so both
    /// must live in one hash slot (the team's). `None` for anyone else.
    home: Option<Arc<str>>,
}

impl Account {
    /// A client's account (its name shared, not copied).
    pub fn client(name: impl Into<Arc<str>>) -> Self {
        let key = name.into();
        debug_assert!(
            !key.starts_with(char::is_control),
            "a client name starting with a control character would take another kind's key"
        );
        Self {
            kind: AccountKind::Client,
            key,
            home: None,
        }
    }

    /// A client's account: a member's of `team` when it has one.
    pub fn of_client(name: impl Into<Arc<str>>, team: Option<&str>) -> Self {
        match team {
            Some(team) => Self::member(name, &Self::team(team)),
            None => Self::client(name),
        }
    }

    /// A member of `team`: a client's account kept beside the team's.
    pub fn member(name: impl Into<Arc<str>>, team: &Account) -> Self {
        Self {
            home: Some(Arc::clone(&team.key)),
            ..Self::client(name)
        }
    }

    /// An upstream's pacing account.
    pub fn upstream(name: &str) -> Self {
        Self::prefixed(AccountKind::Upstream, name)
    }

    /// A team's account.
    pub fn team(name: &str) -> Self {
        Self::prefixed(AccountKind::Team, name)
    }

    fn prefixed(kind: AccountKind, name: &str) -> Self {
        Self {
            kind,
            key: Arc::from(format!("{}{name}", kind.key_prefix())),
            home: None,
        }
    }

    pub fn kind(&self) -> AccountKind {
        self.kind
    }

    /// The client's, the upstream's or the team's name.
    pub fn name(&self) -> &str {
        self.key
            .strip_prefix(self.kind.key_prefix())
            .unwrap_or(&self.key)
    }

    /// Where the stores keep this account: a SQLite row's `client`, the
    /// middle of its Redis keys.
    pub fn key(&self) -> &str {
        &self.key
    }

    /// The storage key of the account this one's windows are kept beside
    /// (a team member's team), if any: the hash slot of its Redis keys.
    pub fn home(&self) -> Option<&str> {
        self.home.as_deref()
    }

    /// The account a storage key holds; `None` for a kind this version
    /// does not know (a newer instance's, sharing the store).
    pub fn from_key(key: &str) -> Option<Self> {
        let prefixed = AccountKind::ALL
            .into_iter()
            .filter(|kind| !kind.key_prefix().is_empty())
            .find(|kind| key.starts_with(kind.key_prefix()));
        match prefixed {
            Some(kind) => Some(Self {
                kind,
                key: Arc::from(key),
                home: None,
            }),
            None if key.starts_with(char::is_control) => None,
            None => Some(Self::client(key)),
        }
    }
}

/// `client alice`, `upstream openai`, `team research`: for logs.
impl fmt::Display for Account {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.kind.label(), self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Existing SQLite rows and Redis keys must keep meaning what they did.
    #[test]
    fn accounts_render_to_the_keys_the_stores_hold() {
        assert_eq!(Account::client("alice").key(), "alice");
        assert_eq!(Account::upstream("openai").key(), "\u{1}upstream/openai");
        assert_eq!(Account::team("blue").key(), "\u{1}team/blue");
        for account in [
            Account::client("alice"),
            Account::upstream("openai"),
            Account::team("blue"),
        ] {
            assert_eq!(Account::from_key(account.key()), Some(account.clone()));
        }
        let upstream = Account::upstream("openai");
        assert_eq!(
            (upstream.kind(), upstream.name()),
            (AccountKind::Upstream, "openai")
        );
        assert_eq!(upstream.to_string(), "upstream openai");
        let team = Account::team("blue");
        assert_eq!(team.key(), "\u{1}team/blue");
        assert_eq!(Account::from_key(team.key()), Some(team.clone()));
        assert_eq!((team.kind(), team.name()), (AccountKind::Team, "blue"));
        assert_eq!(team.to_string(), "team blue");
        let member = Account::member("alice", &team);
        assert_eq!(
            (member.key(), member.home()),
            ("alice", Some("\u{1}team/blue")),
            "a member's windows are the client's, kept beside its team's"
        );
        assert_eq!(
            Account::from_key("\u{1}pool/blue"),
            None,
            "a kind this version does not know is nobody's, not a client's"
        );
    }
}
