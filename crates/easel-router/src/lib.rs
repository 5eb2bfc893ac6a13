//! easel-router: what an image costs, wherever it is made.
//!
//! - [`price`]: a price table for closed providers (per image, per megapixel, per quality
//!   level), with dated defaults from their public price pages, overridable in config;
//! - [`cost`]: the amortised cost of a locally generated image (GPU-seconds times the
//!   machine's hourly price over its utilisation, plus overhead) and the break-even
//!   calculator behind `easel cost`;
//! - [`providers`]: clients for closed image APIs (OpenAI and any OpenAI-compatible server,
//!   Black Forest Labs), each speaking the vendor's documented protocol, with errors sorted
//!   into what a router should do next (try elsewhere, wait, give up);
//! - [`routing`]: aliases, tiers, per-request hints (route, privacy, tier), strategies
//!   (local-first with overflow, cheapest, fastest, ordered), circuit breakers and budgets;
//! - [`ledger`]: the persistent record of every image's provider, model and cost, with the
//!   aggregates `GET /v1/usage` serves.
//!
//! No candle here: a gateway that only routes links none of the tensor code.

pub mod cost;
pub mod ledger;
pub mod price;
pub mod providers;
pub mod routing;

pub use cost::{BreakEven, LocalCost};
pub use ledger::{Ledger, LedgerEntry, Reservation, UsageRow};
pub use price::{Price, PriceTable, Unit};

/// Router failures.
#[derive(Debug, thiserror::Error)]
pub enum RouterError {
    #[error("price table: {0}")]
    Price(String),
    #[error("ledger storage: {0}")]
    Ledger(#[from] rusqlite::Error),
}
