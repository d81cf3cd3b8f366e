//! Money: amounts in millionths of the configured currency, and prices per
//! million tokens. Integers inside, so that no sum drifts: a float is read
//! once, where a user wrote it (the config, the admin API), and written back
//! only where a person or a JSON client reads it.
//!
//! A request's cost is its token counts times the answering deployment's
//! prices, computed exactly (token counts times micro-units per million
//! tokens, divided by a million once, rounded half up to the micro-unit):
//! so each request is charged to the millionth, and a budget's sum is the
//! sum of those.

use std::fmt;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Micro-units of the currency in one unit.
const MICROS_PER_UNIT: u64 = 1_000_000;
/// Prices are per this many tokens.
const TOKENS_PER_PRICE: u128 = 1_000_000;

/// An amount of money, in millionths of the currency unit.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Money(u64);

impl Money {
    pub const ZERO: Money = Money(0);

    pub const fn from_micros(micros: u64) -> Self {
        Money(micros)
    }

    pub const fn micros(self) -> u64 {
        self.0
    }

    /// Currency units as a user wrote them, if they are a finite amount of
    /// at least 0 that fits; rounded to the nearest millionth.
    pub fn from_units(units: f64) -> Option<Self> {
        let micros = (units * MICROS_PER_UNIT as f64).round();
        // 2^64 as f64; a micro amount at or above it does not fit.
        (units.is_finite() && units >= 0.0 && micros < 18_446_744_073_709_551_616.0)
            .then_some(Money(micros as u64))
    }

    /// Currency units, for JSON and people (exact for any amount a budget
    /// holds: below 2^53 micro-units, a few billion units).
    pub fn units(self) -> f64 {
        self.0 as f64 / MICROS_PER_UNIT as f64
    }

    pub fn saturating_add(self, other: Money) -> Money {
        Money(self.0.saturating_add(other.0))
    }
}

/// `12.345678`: the amount to the millionth, trailing zeros kept to the cent
/// (`5.00`, `0.000125`), for messages and tables.
impl fmt::Display for Money {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (whole, fraction) = (self.0 / MICROS_PER_UNIT, self.0 % MICROS_PER_UNIT);
        let digits = format!("{fraction:06}");
        let digits = digits.trim_end_matches('0');
        write!(f, "{whole}.{digits:0<2}")
    }
}

impl Serialize for Money {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_f64(self.units())
    }
}

/// A number of currency units (`5`, `5.0`, `0.15`); a negative, infinite or
/// non-numeric one is refused.
impl<'de> Deserialize<'de> for Money {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let units = f64::deserialize(deserializer)?;
        Money::from_units(units).ok_or_else(|| {
            serde::de::Error::custom(format!(
                "{units} is not an amount of money (a number of currency units, 0 or more)"
            ))
        })
    }
}

/// A model's or a deployment's prices, per million tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Price {
    pub input: Money,
    /// Prompt tokens the provider served from its cache
    /// (`prompt_tokens_details.cached_tokens`).
    pub cached_input: Money,
    pub output: Money,
}

/// A price as written: `cached_input` defaults to `input`.
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(deny_unknown_fields)]
struct PriceInput {
    input: Money,
    cached_input: Option<Money>,
    output: Money,
}

impl<'de> Deserialize<'de> for Price {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let PriceInput {
            input,
            cached_input,
            output,
        } = PriceInput::deserialize(deserializer)?;
        Ok(Price {
            input,
            cached_input: cached_input.unwrap_or(input),
            output,
        })
    }
}

/// Token counts as a provider reports them, for pricing.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TokenCounts {
    pub prompt: u64,
    /// Of `prompt`, served from the provider's cache.
    pub cached: u64,
    /// Includes any reasoning tokens (OpenAI's usage counts them inside
    /// `completion_tokens`), so they are priced once.
    pub completion: u64,
}

impl Price {
    /// What `tokens` cost at these prices, to the millionth (rounded half up).
    pub fn cost(&self, tokens: TokenCounts) -> Money {
        let cached = tokens.cached.min(tokens.prompt);
        let scaled = u128::from(tokens.prompt - cached) * u128::from(self.input.0)
            + u128::from(cached) * u128::from(self.cached_input.0)
            + u128::from(tokens.completion) * u128::from(self.output.0);
        let micros = (scaled + TOKENS_PER_PRICE / 2) / TOKENS_PER_PRICE;
        Money(u64::try_from(micros).unwrap_or(u64::MAX))
    }

    /// The highest of each price among `prices`: what a request is reserved
    /// at before it is known which deployment answers.
    pub fn highest<'a>(prices: impl IntoIterator<Item = &'a Price>) -> Option<Price> {
        prices.into_iter().copied().reduce(|a, b| Price {
            input: a.input.max(b.input),
            cached_input: a.cached_input.max(b.cached_input),
            output: a.output.max(b.output),
        })
    }

    /// What an estimate of `prompt` and `completion` tokens may cost: none
    /// of the prompt assumed cached, at the dearer of the two input prices.
    pub fn most(&self, prompt: u64, completion: u64) -> Money {
        let dearest = Price {
            input: self.input.max(self.cached_input),
            ..*self
        };
        dearest.cost(TokenCounts {
            prompt,
            cached: 0,
            completion,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn price(input: f64, cached_input: f64, output: f64) -> Price {
        Price {
            input: Money::from_units(input).expect("price"),
            cached_input: Money::from_units(cached_input).expect("price"),
            output: Money::from_units(output).expect("price"),
        }
    }

    #[test]
    fn amounts_are_read_to_the_millionth_and_refused_when_not_money() {
        assert_eq!(Money::from_units(2.5), Some(Money(2_500_000)));
        assert_eq!(Money::from_units(0.15), Some(Money(150_000)));
        assert_eq!(Money::from_units(0.0000015), Some(Money(2)));
        assert_eq!(Money::from_units(0.0), Some(Money::ZERO));
        for bad in [-0.01, f64::NAN, f64::INFINITY, 1e30] {
            assert_eq!(Money::from_units(bad), None, "{bad}");
        }
        assert_eq!(Money(5_000_000).to_string(), "5.00");
        assert_eq!(Money(125).to_string(), "0.000125");
        assert_eq!(Money(1_234_500).to_string(), "1.2345");
        assert_eq!(Money(5_000_000).units(), 5.0);
    }

    #[test]
    fn cost_counts_cached_tokens_at_their_price_and_rounds_once() {
        // 2.50 / 1.25 / 10.00 per million: 1000 prompt tokens of which 400
        // cached, 250 completion tokens (reasoning inside them):
        // 600 * 2.5 + 400 * 1.25 + 250 * 10 = 1500 + 500 + 2500 = 4500
        // micro-units per... million tokens: 0.0045 units.
        let p = price(2.50, 1.25, 10.00);
        let cost = p.cost(TokenCounts {
            prompt: 1000,
            cached: 400,
            completion: 250,
        });
        assert_eq!(cost, Money(4500));
        // One token at 2.50 per million is 2.5 micro-units: rounded half up.
        assert_eq!(
            p.cost(TokenCounts {
                prompt: 1,
                ..TokenCounts::default()
            }),
            Money(3)
        );
        // More cached than prompt (a provider's mistake) is not negative.
        assert_eq!(
            p.cost(TokenCounts {
                prompt: 10,
                cached: 20,
                completion: 0
            }),
            Money(13)
        );
    }

    #[test]
    fn the_estimate_is_priced_at_the_dearest_prices() {
        let cheap = price(0.10, 0.05, 0.40);
        let dear = price(3.00, 0.30, 15.00);
        let highest = Price::highest([&cheap, &dear]).expect("two prices");
        assert_eq!(highest, price(3.00, 0.30, 15.00));
        // 1000 * 3.00 + 100 * 15.00 = 4500 per million tokens.
        assert_eq!(highest.most(1000, 100), Money(4500));
        assert_eq!(Price::highest([]), None);
    }

    #[test]
    fn prices_deserialize_with_cached_input_defaulting_to_input() {
        let p: Price = serde_json::from_str(r#"{"input": 2.5, "output": 10}"#).expect("price");
        assert_eq!(p, price(2.5, 2.5, 10.0));
        assert!(serde_json::from_str::<Price>(r#"{"input": "2.5", "output": 10}"#).is_err());
        assert!(serde_json::from_str::<Price>(r#"{"input": -1, "output": 10}"#).is_err());
        assert!(serde_json::from_str::<Price>(r#"{"input": 1, "output": 1, "x": 1}"#).is_err());
    }
}
