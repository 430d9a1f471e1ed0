//! A plain component for Keel's "any component's exports as tools" tests: no `keel:plugin` world,
//! only ordinary WIT functions (world-level and in the `shapes` interface) over every mapped type.

// `ints` takes one parameter per integer type: eight, on purpose.
#![allow(clippy::too_many_arguments)]

wit_bindgen::generate!({ world: "plain", path: "wit" });

use exports::test::plain::shapes::{self, Color, Perms, Point, Shape};

struct Plain;

impl Guest for Plain {
    fn greet(name: String) -> String {
        format!("Hello, {name}!")
    }

    fn negate(b: bool) -> bool {
        !b
    }

    fn ints(a: i8, b: u8, c: i16, d: u16, e: i32, f: u32, g: i64, h: u64) -> (i8, u8, i16, u16, i32, u32, i64, u64) {
        (a, b, c, d, e, f, g, h)
    }

    fn floats(a: f32, b: f64) -> (f32, f64) {
        (a, b)
    }

    fn divide(a: f64, b: f64) -> f64 {
        a / b
    }

    fn next_char(c: char) -> char {
        char::from_u32(c as u32 + 1).unwrap_or(c)
    }

    fn sum(xs: Vec<i64>) -> i64 {
        xs.iter().fold(0i64, |acc, x| acc.wrapping_add(*x))
    }

    fn maybe(x: Option<u32>, y: u32) -> Option<u32> {
        x.map(|x| x + y)
    }

    fn checked_div(a: i32, b: i32) -> Result<i32, String> {
        a.checked_div(b).ok_or_else(|| format!("cannot divide {a} by {b}"))
    }

    fn noop() {}

    fn crash(message: String) {
        panic!("{message}");
    }

    fn spin() {
        let mut n: u64 = 0;
        loop {
            n = std::hint::black_box(n.wrapping_add(1));
        }
    }

    fn hog(mib: u32) -> u32 {
        let mut blocks = Vec::new();
        for _ in 0..mib {
            blocks.push(std::hint::black_box(vec![1u8; 1 << 20]));
        }
        blocks.len() as u32
    }
}

/// The resource exists only so the host has a function to refuse.
struct Counter(std::cell::Cell<u32>);

impl shapes::GuestCounter for Counter {
    fn new() -> Self {
        Counter(std::cell::Cell::new(0))
    }

    fn bump(&self) -> u32 {
        self.0.set(self.0.get() + 1);
        self.0.get()
    }
}

impl shapes::Guest for Plain {
    type Counter = Counter;

    fn echo_point(p: Point) -> Point {
        p
    }

    fn echo_shape(s: Shape) -> Shape {
        s
    }

    fn area(s: Shape) -> f64 {
        match s {
            Shape::Circle(r) => std::f64::consts::PI * r * r,
            Shape::Rect((w, h)) => f64::from(w) * f64::from(h),
            Shape::Empty => 0.0,
        }
    }

    fn next_color(c: Color) -> Color {
        match c {
            Color::Red => Color::Green,
            Color::Green => Color::Blue,
            Color::Blue => Color::Red,
        }
    }

    fn toggle(p: Perms) -> Perms {
        (Perms::READ | Perms::WRITE | Perms::EXEC) ^ p
    }

    fn wrap(r: Result<u8, String>) -> Vec<Result<u8, String>> {
        vec![r]
    }

    fn make_counter() -> shapes::Counter {
        shapes::Counter::new(<Counter as shapes::GuestCounter>::new())
    }
}

impl exports::test::plain::hostile::Guest for Plain {
    fn deep(x: exports::test::plain::hostile::L40) -> u32 {
        x.len() as u32
    }

    fn wide(_x: exports::test::plain::hostile::T12) {}
}

export!(Plain);
