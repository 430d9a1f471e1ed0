//! Model prices: built-in defaults, overridable from config.

use std::collections::BTreeMap;

use keel_kernel::model::{ModelPrice, TokenUsage};
use rust_decimal::Decimal;

/// Built-in prices in USD per million tokens (input, output), as published by the vendors in 2025. They are
/// defaults only: vendors change prices, so `[models.prices]` overrides any of them.
const BUILTIN: &[(&str, &str, &str)] = &[
    ("gpt-4o", "2.50", "10.00"),
    ("gpt-4o-mini", "0.15", "0.60"),
    ("gpt-4.1", "2.00", "8.00"),
    ("gpt-4.1-mini", "0.40", "1.60"),
    ("gpt-4.1-nano", "0.10", "0.40"),
    ("o4-mini", "1.10", "4.40"),
    ("claude-opus-4-1", "15.00", "75.00"),
    ("claude-sonnet-4", "3.00", "15.00"),
    ("claude-sonnet-4-5", "3.00", "15.00"),
    ("claude-haiku-4-5", "1.00", "5.00"),
    ("claude-3-5-haiku", "0.80", "4.00"),
];

/// Prices by model name.
///
/// Lookup is exact first, then the longest entry that is a `-`-separated prefix of the name, so dated snapshots
/// (`gpt-4o-2024-08-06`, `claude-sonnet-4-5-20250929`) get their family's price. Unknown models are unpriced:
/// [`PriceTable::price`] returns `None` and their usage costs zero.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PriceTable {
    prices: BTreeMap<String, ModelPrice>,
}

impl PriceTable {
    /// An empty table: every model unpriced.
    pub fn empty() -> Self {
        Self::default()
    }

    /// The built-in defaults.
    pub fn builtin() -> Self {
        let prices = BUILTIN
            .iter()
            .map(|(model, input, output)| {
                let price = ModelPrice {
                    input_per_mtok: input.parse().expect("built-in price"),
                    output_per_mtok: output.parse().expect("built-in price"),
                };
                (model.to_string(), price)
            })
            .collect();
        Self { prices }
    }

    /// Sets (or overrides) one model's price.
    pub fn set(&mut self, model: impl Into<String>, price: ModelPrice) {
        self.prices.insert(model.into(), price);
    }

    /// This table with `overrides` applied on top.
    pub fn with_overrides<'a>(mut self, overrides: impl IntoIterator<Item = (&'a String, &'a ModelPrice)>) -> Self {
        for (model, price) in overrides {
            self.set(model.clone(), *price);
        }
        self
    }

    /// The price of `model`, if known.
    pub fn price(&self, model: &str) -> Option<ModelPrice> {
        if let Some(price) = self.prices.get(model) {
            return Some(*price);
        }
        self.prices
            .iter()
            .filter(|(name, _)| model.len() > name.len() && model.starts_with(name.as_str()))
            .filter(|(name, _)| model.as_bytes()[name.len()] == b'-')
            .max_by_key(|(name, _)| name.len())
            .map(|(_, price)| *price)
    }

    /// Usage for `input` + `output` tokens of `model`, costed (zero when unpriced).
    pub fn usage(&self, model: &str, input: u64, output: u64) -> TokenUsage {
        let cost = self.price(model).map_or(Decimal::ZERO, |p| p.cost(input, output));
        TokenUsage {
            input_tokens: input,
            output_tokens: output,
            cost,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtin_and_snapshot_prefix() {
        let t = PriceTable::builtin();
        assert_eq!(t.price("gpt-4o").unwrap().input_per_mtok, "2.50".parse().unwrap());
        assert_eq!(
            t.price("gpt-4o-mini-2024-07-18").unwrap().input_per_mtok,
            "0.15".parse().unwrap()
        );
        assert_eq!(
            t.price("gpt-4o-2024-08-06").unwrap().input_per_mtok,
            "2.50".parse().unwrap()
        );
        assert_eq!(
            t.price("claude-sonnet-4-5-20250929").unwrap().output_per_mtok,
            "15".parse().unwrap()
        );
        assert!(t.price("gpt-4").is_none());
        assert!(t.price("gpt-4oo").is_none());
        assert!(t.price("llama3").is_none());
        assert_eq!(t.usage("llama3", 10, 10).cost, Decimal::ZERO);
        // 1000 in * 0.15/M + 500 out * 0.60/M = 0.00015 + 0.0003
        assert_eq!(
            t.usage("gpt-4o-mini", 1000, 500).cost,
            "0.00045".parse::<Decimal>().unwrap()
        );
    }
}
