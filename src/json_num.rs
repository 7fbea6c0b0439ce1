//! Whole numbers as JSON Schema counts them: `5` and `5.0` are both the
//! integer 5 there, so an API that says "integer" takes both. serde alone
//! refuses `5.0` for an integer field.

use serde::de::{Deserializer, Error};
use serde::Deserialize;

fn whole<'de, D: Deserializer<'de>, T: TryFrom<u64>>(
    value: serde_json::Value,
) -> Result<T, D::Error> {
    let n = match &value {
        serde_json::Value::Number(n) => n.as_u64().or_else(|| {
            n.as_f64()
                .filter(|f| f.fract() == 0.0 && *f >= 0.0 && *f < 1.8e19)
                .map(|f| f as u64)
        }),
        _ => None,
    };
    n.and_then(|n| T::try_from(n).ok())
        .ok_or_else(|| D::Error::custom(format!("expected a whole number in range, got {value}")))
}

pub fn u32<'de, D: Deserializer<'de>>(d: D) -> Result<u32, D::Error> {
    whole::<D, u32>(serde_json::Value::deserialize(d)?)
}

pub fn u64<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    whole::<D, u64>(serde_json::Value::deserialize(d)?)
}

pub fn opt_u32<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u32>, D::Error> {
    match Option::<serde_json::Value>::deserialize(d)? {
        None | Some(serde_json::Value::Null) => Ok(None),
        Some(v) => whole::<D, u32>(v).map(Some),
    }
}

pub fn opt_u64<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    match Option::<serde_json::Value>::deserialize(d)? {
        None | Some(serde_json::Value::Null) => Ok(None),
        Some(v) => whole::<D, u64>(v).map(Some),
    }
}

#[cfg(test)]
mod tests {
    #[derive(serde::Deserialize, Debug)]
    struct T {
        #[serde(default, deserialize_with = "super::opt_u32")]
        a: Option<u32>,
        #[serde(deserialize_with = "super::u64")]
        b: u64,
    }

    #[test]
    fn whole_floats_are_integers_and_nothing_else_is() {
        let t: T = serde_json::from_str(r#"{"a": 5.0, "b": 7}"#).unwrap();
        assert_eq!((t.a, t.b), (Some(5), 7));
        let t: T = serde_json::from_str(r#"{"b": 7.0}"#).unwrap();
        assert_eq!(t.a, None);
        let t: T = serde_json::from_str(r#"{"a": null, "b": 0}"#).unwrap();
        assert_eq!(t.a, None);
        for bad in [
            r#"{"b": 7.5}"#,
            r#"{"b": -1}"#,
            r#"{"b": "7"}"#,
            r#"{"a": 4294967296, "b": 1}"#,
        ] {
            assert!(serde_json::from_str::<T>(bad).is_err(), "{bad}");
        }
    }
}
