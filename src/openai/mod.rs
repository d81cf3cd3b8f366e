//! The wire types Iris looks inside: chat completion and embeddings
//! requests, kept mostly raw, and the usage a response reports.

pub mod chat;
pub mod embeddings;
pub mod raw;
pub mod spliced;
pub mod stream;

/// The OpenAI APIs Iris serves, each at its own path, upstream as at Iris.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub enum Api {
    /// `POST /v1/chat/completions`.
    #[default]
    Chat,
    /// `POST /v1/embeddings`.
    Embeddings,
}

impl Api {
    /// Its name in the config (`models[].endpoint`), the spend log and
    /// metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Chat => "chat",
            Self::Embeddings => "embeddings",
        }
    }

    /// Its path below an upstream's `base_url`.
    pub fn path(self) -> &'static str {
        match self {
            Self::Chat => "chat/completions",
            Self::Embeddings => "embeddings",
        }
    }

    /// Its path on Iris.
    pub fn client_path(self) -> &'static str {
        match self {
            Self::Chat => "/v1/chat/completions",
            Self::Embeddings => "/v1/embeddings",
        }
    }

    /// The API a client `POST`s to at `path` on Iris, if any.
    pub fn at_client_path(path: &str) -> Option<Self> {
        [Self::Chat, Self::Embeddings]
            .into_iter()
            .find(|api| api.client_path() == path)
    }

    /// How a client calls it, for error messages.
    pub fn route(self) -> &'static str {
        match self {
            Self::Chat => "POST /v1/chat/completions",
            Self::Embeddings => "POST /v1/embeddings",
        }
    }
}
