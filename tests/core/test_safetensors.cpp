// Tests of sma/io/safetensors.hpp, sma/io/dtype.hpp (half / bfloat16) and sma/io/atomic_file.hpp.
#include <catch2/catch.hpp>
#include <sma/io/safetensors.hpp>
#include <sma/testing/temp_dir.hpp>

#include <nlohmann/json.hpp>

#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <filesystem>
#include <limits>
#include <string>
#include <vector>

#include <sys/stat.h>
#include <unistd.h>

using namespace sma;
using namespace sma::io;
using Catch::Matchers::Contains;
namespace fs = std::filesystem;

namespace {

std::vector<std::uint8_t> file_bytes(const std::string& path) { return read_file_bytes(path); }

// 8-byte length + header text + data, with no checks: the raw material of the malformed-file tests.
std::vector<std::uint8_t> build_file(const std::string& header, const std::vector<std::uint8_t>& data,
                                     std::uint64_t declared_len = std::numeric_limits<std::uint64_t>::max()) {
  const std::uint64_t n = declared_len == std::numeric_limits<std::uint64_t>::max() ? header.size() : declared_len;
  std::vector<std::uint8_t> out(8 + header.size() + data.size());
  for (int i = 0; i < 8; ++i) out[static_cast<std::size_t>(i)] = static_cast<std::uint8_t>(n >> (8 * i));
  std::copy(header.begin(), header.end(), out.begin() + 8);
  std::copy(data.begin(), data.end(), out.begin() + 8 + static_cast<std::ptrdiff_t>(header.size()));
  return out;
}

std::string golden_dir() {
  if (const char* env = std::getenv("SMA_GOLDEN_DIR")) return env;
  return SMA_GOLDEN_DIR_DEFAULT;
}

void expect_bad(const std::vector<std::uint8_t>& bytes, const std::string& fragment) {
  INFO("expected an IoError containing: " << fragment);
  CHECK_THROWS_AS(SafetensorsFile(bytes, "bad.safetensors"), IoError);
  CHECK_THROWS_WITH(SafetensorsFile(bytes, "bad.safetensors"), Contains(fragment) && Contains("bad.safetensors"));
}

void expect_bad(const std::string& header, std::size_t data_size, const std::string& fragment) {
  INFO("header: " << header);
  expect_bad(build_file(header, std::vector<std::uint8_t>(data_size, 0)), fragment);
}

std::uint32_t float_bits(float f) {
  std::uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}

std::vector<std::uint8_t> from_hex(const std::string& hex) {
  std::vector<std::uint8_t> out(hex.size() / 2);
  for (std::size_t i = 0; i < out.size(); ++i) out[i] = static_cast<std::uint8_t>(std::stoi(hex.substr(2 * i, 2), nullptr, 16));
  return out;
}

// Written by huggingface safetensors 0.8.0 (safetensors.torch.save_file, torch 2.11) from:
//   f32 = [(i % 7) * 0.5 - 1.25 for i < 10] as (2, 5); bf16, f16 = the same for i < 6; i64 = [3i - 5 for i < 4];
//   bool = [i % 3 == 0 for i < 5]; bf16_round, f16_round = float32 s_i = (i + 1) / 3 * (-1)^i * 10^(i % 5 - 2),
//   i < 40, converted by torch; metadata {"case": "theirs"}. Note it orders tensors by alignment, not by name.
// 733 bytes
const char* const kOfficialSafetensorsHex =
    "d0010000000000007b225f5f6d657461646174615f5f223a7b2263617365223a22746865697273227d2c22693634223a7b22647479706522"
    "3a22493634222c227368617065223a5b345d2c22646174615f6f666673657473223a5b302c33325d7d2c22663332223a7b22647479706522"
    "3a22463332222c227368617065223a5b322c355d2c22646174615f6f666673657473223a5b33322c37325d7d2c2262663136223a7b226474"
    "797065223a2242463136222c227368617065223a5b365d2c22646174615f6f666673657473223a5b37322c38345d7d2c22626631365f726f"
    "756e64223a7b226474797065223a2242463136222c227368617065223a5b34305d2c22646174615f6f666673657473223a5b38342c313634"
    "5d7d2c22663136223a7b226474797065223a22463136222c227368617065223a5b365d2c22646174615f6f666673657473223a5b3136342c"
    "3137365d7d2c226631365f726f756e64223a7b226474797065223a22463136222c227368617065223a5b34305d2c22646174615f6f666673"
    "657473223a5b3137362c3235365d7d2c22626f6f6c223a7b226474797065223a22424f4f4c222c227368617065223a5b355d2c2264617461"
    "5f6f666673657473223a5b3235362c3236315d7d7d202020fbfffffffffffffffeffffffffffffff01000000000000000400000000000000"
    "0000a0bf000040bf000080be0000803e0000403f0000a03f0000e03f0000a0bf000040bf000080bea0bf40bf80be803e403fa03f5a3b89bd"
    "803f55c12743a4bc6f3e2bc0f041a7c3163dcdbe8b403bc2fa435abd113fc0c07d4227c48f3d3cbff540a0c25044b1bd663f15c1c1427ac4"
    "d43d89bf3041e3c29244f6bd9e3f4bc10243a7c400bd00ba00b40034003a003dd41a44ac003cabca35591fa5773355c1804f35ddb12866b6"
    "5544d5d1d05fd4aa893800c6eb5335e17b2cdeb9ab4700d583628cad333babc80b56d0e39d2e44bc804915d78f64aeafef3c55ca105835e5"
    "0100000100";

}  // namespace

TEST_CASE("DType sizes and names round-trip", "[io][dtype]") {
  const std::vector<std::pair<DType, std::size_t>> all = {{DType::F64, 8}, {DType::F32, 4}, {DType::F16, 2},
                                                          {DType::BF16, 2}, {DType::I64, 8}, {DType::I32, 4},
                                                          {DType::U8, 1},  {DType::BOOL, 1}};
  for (const auto& [t, size] : all) {
    CHECK(dtype_size(t) == size);
    CHECK(parse_dtype(to_string(t)) == t);
  }
  CHECK(std::string(to_string(DType::BF16)) == "BF16");
  CHECK_THROWS_AS(parse_dtype("f32"), ValueError);  // case-sensitive, as the format
  CHECK_THROWS_WITH(parse_dtype("F8"), Contains("unknown dtype \"F8\""));
  CHECK(dtype_of<double> == DType::F64);
  CHECK(dtype_of<std::uint8_t> == DType::U8);
}

TEST_CASE("half and bfloat16 conversions round to nearest even and widen exactly", "[io][dtype]") {
  SECTION("binary16 known values") {
    CHECK(float_to_half(1.0f) == 0x3C00);
    CHECK(float_to_half(-2.0f) == 0xC000);
    CHECK(float_to_half(0.0f) == 0x0000);
    CHECK(float_to_half(-0.0f) == 0x8000);
    CHECK(float_to_half(65504.0f) == 0x7BFF);                   // largest finite
    CHECK(float_to_half(65519.0f) == 0x7BFF);                   // below the midpoint to 65536
    CHECK(float_to_half(65520.0f) == 0x7C00);                   // the midpoint: ties to even = 65536 = overflow
    CHECK(float_to_half(1e6f) == 0x7C00);
    CHECK(float_to_half(std::ldexp(1.0f, -24)) == 0x0001);      // smallest subnormal
    CHECK(float_to_half(std::ldexp(1.0f, -25)) == 0x0000);      // half of it: tie, rounds to even 0
    CHECK(float_to_half(std::ldexp(1.5f, -25)) == 0x0001);      // above the tie
    CHECK(float_to_half(std::ldexp(3.0f, -25)) == 0x0002);      // 1.5 units: tie, rounds to even 2
    CHECK(float_to_half(std::ldexp(1.0f, -14)) == 0x0400);      // smallest normal
    CHECK(float_to_half(std::ldexp(1023.5f, -24)) == 0x0400);   // subnormal rounding up into the normals
    CHECK(float_to_half(1.0f + std::ldexp(1.0f, -11)) == 0x3C00);       // tie between 1 and 1+2^-10: even
    CHECK(float_to_half(1.0f + 3 * std::ldexp(1.0f, -11)) == 0x3C02);   // tie between odd and even: up
    CHECK(float_to_half(0.1f) == 0x2E66);
    CHECK(float_to_half(std::numeric_limits<float>::infinity()) == 0x7C00);
    CHECK(float_to_half(-std::numeric_limits<float>::infinity()) == 0xFC00);
    const std::uint16_t nan = float_to_half(std::numeric_limits<float>::quiet_NaN());
    CHECK((nan & 0x7C00) == 0x7C00);
    CHECK((nan & 0x03FF) != 0);
    CHECK(half_to_float(0x3C00) == 1.0f);
    CHECK(half_to_float(0x7BFF) == 65504.0f);
    CHECK(half_to_float(0x0001) == std::ldexp(1.0f, -24));
    CHECK(half_to_float(0x8000) == 0.0f);
    CHECK(std::signbit(half_to_float(0x8000)));
    CHECK(std::isinf(half_to_float(0xFC00)));
    CHECK(std::isnan(half_to_float(0x7E00)));
  }
  SECTION("bfloat16 known values") {
    CHECK(float_to_bf16(1.0f) == 0x3F80);
    CHECK(float_to_bf16(-1.0f) == 0xBF80);
    CHECK(float_to_bf16(3.14159265f) == 0x4049);
    CHECK(float_to_bf16(1.0f + std::ldexp(1.0f, -8)) == 0x3F80);       // tie: even
    CHECK(float_to_bf16(1.0f + 3 * std::ldexp(1.0f, -8)) == 0x3F82);   // tie: up to even
    CHECK(float_to_bf16(1.0f + std::ldexp(1.0f, -8) + std::ldexp(1.0f, -20)) == 0x3F81);
    CHECK(float_to_bf16(std::numeric_limits<float>::max()) == 0x7F80);  // rounds up to infinity
    CHECK(float_to_bf16(std::numeric_limits<float>::denorm_min()) == 0x0000);
    CHECK(float_to_bf16(std::ldexp(1.0f, -133)) == 0x0001);  // smallest bf16 subnormal
    const std::uint16_t nan = float_to_bf16(std::numeric_limits<float>::quiet_NaN());
    CHECK(std::isnan(bf16_to_float(nan)));
    CHECK(bf16_to_float(0x4049) == 3.140625f);
    CHECK(bf16_to_float(0xFF80) == -std::numeric_limits<float>::infinity());
  }
  SECTION("widening then narrowing is the identity on every non-NaN bit pattern") {
    int checked_half = 0, checked_bf16 = 0, exact_bf16_widening = 0;
    for (std::uint32_t b = 0; b <= 0xFFFF; ++b) {
      const auto h = static_cast<std::uint16_t>(b);
      const float fh = half_to_float(h);
      if (!std::isnan(fh)) {
        checked_half += float_to_half(fh) == h && double_to_half(static_cast<double>(fh)) == h;
      } else {
        checked_half += std::isnan(half_to_float(float_to_half(fh)));
      }
      const float fb = bf16_to_float(h);
      exact_bf16_widening += float_bits(fb) == (b << 16);  // bf16 widening is exact, NaN payloads included
      if (!std::isnan(fb)) checked_bf16 += float_to_bf16(fb) == h;
      else checked_bf16 += std::isnan(bf16_to_float(float_to_bf16(fb)));
    }
    CHECK(checked_half == 65536);
    CHECK(checked_bf16 == 65536);
    CHECK(exact_bf16_widening == 65536);
  }
  SECTION("the double overloads round once, not twice through float") {
    // 1 + 2^-11 + 2^-40 lies just above a binary16 tie; through float it would land exactly on the tie and round
    // down to 1.0.
    const double x = 1.0 + std::ldexp(1.0, -11) + std::ldexp(1.0, -40);
    CHECK(float_to_half(static_cast<float>(x)) == 0x3C00);
    CHECK(double_to_half(x) == 0x3C01);
    const double y = 1.0 + std::ldexp(1.0, -8) + std::ldexp(1.0, -40);
    CHECK(float_to_bf16(static_cast<float>(y)) == 0x3F80);
    CHECK(double_to_bf16(y) == 0x3F81);
  }
  SECTION("nearest-value property on random floats") {
    std::uint32_t state = 12345;
    for (int i = 0; i < 20000; ++i) {
      state = state * 1664525u + 1013904223u;
      const float f = std::ldexp(static_cast<float>(state >> 8) / 16777216.0f, static_cast<int>(state % 40) - 25);
      const float h = half_to_float(float_to_half(f));
      const float up = half_to_float(static_cast<std::uint16_t>(float_to_half(f) + 1));
      const float down = float_to_half(f) == 0 ? 0.0f : half_to_float(static_cast<std::uint16_t>(float_to_half(f) - 1));
      if (std::isinf(h)) continue;
      REQUIRE(std::fabs(h - f) <= std::fabs(up - f));
      REQUIRE(std::fabs(h - f) <= std::fabs(down - f));
    }
  }
}

TEST_CASE("safetensors round trip for every dtype", "[io][safetensors]") {
  testing::TempDir dir("sma_io_test");
  const std::string path = dir.file("all.safetensors");

  Tensor3<double> f64(2, 3, 4);
  for (Index i = 0; i < f64.size(); ++i) f64.data()[i] = 0.1 * static_cast<double>(i) - 1.0 / 3.0;
  Tensor2<float> f32(3, 5);
  for (Index i = 0; i < f32.size(); ++i) f32.data()[i] = std::ldexp(static_cast<float>(i) - 7.f, -3) + 1e-7f;
  Tensor1<double> halfs(6);  // exactly representable in binary16 and bfloat16
  halfs.setValues({0.0, -1.5, 0.25, 96.0, -0.0078125, 3.0});
  Tensor1<std::int64_t> i64(4);
  i64.setValues({0, -1, std::numeric_limits<std::int64_t>::max(), std::numeric_limits<std::int64_t>::min()});
  Tensor2<std::int32_t> i32(2, 2);
  i32.setValues({{1, -2}, {std::numeric_limits<std::int32_t>::min(), 7}});
  Tensor2<std::uint8_t> u8(2, 3);
  u8.setValues({{0, 1, 255}, {3, 4, 5}});
  Tensor1<bool> flags(3);
  flags.setValues({true, false, true});
  Tensor<double, 0> scalar;
  scalar() = 2.5;
  Tensor2<float> empty(0, 3);

  SafetensorsWriter w;
  w.add("w.f64", f64)
      .add("w.f32", f32)
      .add("h.f16", halfs, DType::F16)
      .add("h.bf16", halfs, DType::BF16)
      .add("n.i64", i64)
      .add("n.i32", i32)
      .add("n.u8", u8)
      .add("n.bool", flags)
      .add("scalar", scalar)
      .add("empty", empty)
      .add("f64.as_f32", f64, DType::F32);
  w.set_metadata("case", "round_trip").set_metadata("config", R"({"embed_dim": 16})").set_metadata("unicode", "μ");
  w.save(path);
  CHECK_FALSE(fs::exists(temp_path_for(path)));

  const auto bytes = file_bytes(path);
  std::uint64_t n = 0;
  for (int i = 0; i < 8; ++i) n |= static_cast<std::uint64_t>(bytes[static_cast<std::size_t>(i)]) << (8 * i);
  CHECK(n % 8 == 0);  // header padded: the data block is 8-byte aligned
  CHECK(bytes[8] == '{');

  SafetensorsFile f(path);
  CHECK(f.size() == 11);
  const auto names = f.names();
  CHECK(std::is_sorted(names.begin(), names.end()));
  // Tensors are stored in name order, back to back.
  std::uint64_t cursor = 0;
  for (const auto& name : names) {
    CHECK(f.info(name).begin == cursor);
    cursor = f.info(name).end;
  }
  CHECK(f.data_offset() + cursor == bytes.size());

  CHECK(f.info("w.f64").dtype == DType::F64);
  CHECK(f.info("w.f64").shape == std::vector<Index>{2, 3, 4});
  const auto r64 = f.tensor<double, 3>("w.f64");
  CHECK(std::equal(r64.data(), r64.data() + r64.size(), f64.data()));  // bit-exact
  const auto r32 = f.tensor<float, 2>("w.f32");
  CHECK(std::equal(r32.data(), r32.data() + r32.size(), f32.data()));
  const auto r32d = f.tensor<double, 2>("w.f32");  // widening F32 -> double
  for (Index i = 0; i < f32.size(); ++i) CHECK(r32d.data()[i] == static_cast<double>(f32.data()[i]));
  CHECK(f.info("h.f16").dtype == DType::F16);
  CHECK(f.info("h.bf16").nbytes() == 12);
  const auto rh = f.tensor<double, 1>("h.f16");
  const auto rb = f.tensor<float, 1>("h.bf16");
  for (Index i = 0; i < 6; ++i) {
    CHECK(rh(i) == halfs(i));
    CHECK(rb(i) == static_cast<float>(halfs(i)));
  }
  const auto r_i64 = f.tensor<std::int64_t, 1>("n.i64");
  for (Index i = 0; i < 4; ++i) CHECK(r_i64(i) == i64(i));
  const auto r_i32 = f.tensor<std::int32_t, 2>("n.i32");
  CHECK(r_i32(1, 0) == std::numeric_limits<std::int32_t>::min());
  CHECK(r_i32(0, 1) == -2);
  const auto r_u8 = f.tensor<std::uint8_t, 2>("n.u8");
  CHECK(r_u8(0, 2) == 255);
  CHECK(r_u8(1, 2) == 5);
  const auto r_b = f.tensor<bool, 1>("n.bool");
  CHECK((r_b(0) && !r_b(1) && r_b(2)));
  CHECK(f.info("scalar").shape.empty());
  CHECK(f.tensor<double, 0>("scalar")() == 2.5);
  CHECK(f.info("empty").nbytes() == 0);
  CHECK(f.tensor<float, 2>("empty").dimension(0) == 0);
  const auto narrowed = f.tensor<double, 3>("f64.as_f32");
  for (Index i = 0; i < f64.size(); ++i) CHECK(narrowed.data()[i] == static_cast<double>(static_cast<float>(f64.data()[i])));

  // Integer dtypes load into wider or floating types; the metadata round-trips as strings.
  const auto as_double = f.values_as_double("n.u8");
  CHECK(as_double == std::vector<double>{0, 1, 255, 3, 4, 5});
  CHECK(f.values<std::int64_t>("n.i32")[2] == std::numeric_limits<std::int32_t>::min());
  CHECK(f.metadata().size() == 3);
  CHECK(f.metadata_value("case") == "round_trip");
  CHECK(nlohmann::json::parse(f.metadata_value("config"))["embed_dim"] == 16);
  CHECK(f.metadata_value("unicode") == "μ");
  const ByteView raw = f.raw("n.u8");
  REQUIRE(raw.size == 6);
  CHECK(raw.data[2] == 255);

  // Re-saving from raw bytes reproduces the file exactly.
  SafetensorsWriter copy;
  for (const auto& name : names) {
    const auto& ti = f.info(name);
    copy.add_raw(name, ti.dtype, ti.shape, f.raw(name).data, f.raw(name).size);
  }
  for (const auto& kv : f.metadata()) copy.set_metadata(kv.first, kv.second);
  CHECK(copy.to_bytes() == bytes);
}

TEST_CASE("safetensors accessors report missing names, ranks, shapes and dtypes", "[io][safetensors]") {
  Tensor2<double> a(2, 3);
  a.setConstant(1.0);
  Tensor1<std::int64_t> big(2);
  big.setValues({1, std::int64_t{1} << 40});
  SafetensorsWriter w;
  w.add("a", a).add("big", big).set_metadata("case", "x");
  const SafetensorsFile f(w.to_bytes(), "mem.safetensors");

  CHECK_THROWS_AS((f.tensor<double, 2>("missing")), KeyError);
  CHECK_THROWS_WITH((f.tensor<double, 2>("missing")),
                    Contains("no tensor named 'missing'") && Contains("mem.safetensors") && Contains("a, big"));
  CHECK_THROWS_AS(f.info("nope"), KeyError);
  CHECK_FALSE(f.contains("nope"));
  CHECK(f.contains("a"));

  CHECK_THROWS_AS((f.tensor<double, 3>("a")), ShapeError);
  CHECK_THROWS_WITH((f.tensor<double, 3>("a")), Contains("tensor 'a'") && Contains("(2, 3)") && Contains("(*, *, *)"));
  CHECK_THROWS_WITH((f.tensor<double, 2>("a", {3, 2})), Contains("expected shape (3, 2), stored shape (2, 3)"));
  CHECK_NOTHROW(f.tensor<double, 2>("a", {2, 3}));
  std::vector<float> buf(6);
  CHECK_THROWS_AS(f.read_into("a", buf.data(), {6}), ShapeError);
  f.read_into("a", buf.data(), {2, 3});
  CHECK(buf[5] == 1.0f);

  CHECK_THROWS_AS((f.tensor<std::int64_t, 2>("a")), KeyError);  // floating dtype into an integer type
  CHECK_THROWS_WITH((f.tensor<std::int64_t, 2>("a")), Contains("floating dtype F64"));
  CHECK_THROWS_AS((f.tensor<std::int32_t, 1>("big")), ValueError);  // 2^40 does not fit int32
  CHECK_THROWS_WITH((f.tensor<std::int32_t, 1>("big")), Contains("1099511627776") && Contains("flat index 1"));
  CHECK(f.tensor<double, 1>("big")(1) == std::ldexp(1.0, 40));

  CHECK(f.metadata_value("case") == "x");
  CHECK_THROWS_AS(f.metadata_value("config"), KeyError);
  CHECK_THROWS_WITH(f.metadata_value("config"), Contains("no metadata key 'config'") && Contains("present: case"));
}

TEST_CASE("SafetensorsWriter rejects duplicate names, bad sizes and lossy conversions", "[io][safetensors]") {
  Tensor1<double> a(3);
  a.setValues({1.0, 2.5, -3.0});
  SafetensorsWriter w;
  w.add("a", a);
  CHECK_THROWS_AS(w.add("a", a), KeyError);
  CHECK_THROWS_WITH(w.add("a", a), Contains("'a' was already added"));
  CHECK_THROWS_AS(w.add("__metadata__", a), KeyError);
  const std::uint8_t bytes[5] = {};
  CHECK_THROWS_AS(w.add_raw("r", DType::F32, {2}, bytes, 5), ValueError);
  CHECK_THROWS_WITH(w.add_raw("r", DType::F32, {2}, bytes, 5), Contains("needs 8 bytes, got 5"));
  CHECK_FALSE(w.contains("r"));  // a failed add leaves nothing behind
  CHECK_THROWS_AS(w.add_raw("neg", DType::U8, {-1}, bytes, 0), ValueError);
  CHECK_THROWS_AS(w.add("as_int", a, DType::I32), ValueError);
  CHECK_FALSE(w.contains("as_int"));
  Tensor1<std::int64_t> wide(1);
  wide(0) = 300;
  CHECK_THROWS_WITH(w.add("u8", wide, DType::U8), Contains("value 300") && Contains("U8"));
  CHECK_FALSE(w.contains("u8"));
  w.add("i32", wide, DType::I32);
  w.add("as_f64", wide, DType::F64);
  const SafetensorsFile f(w.to_bytes(), "mem");
  CHECK(f.tensor<std::int32_t, 1>("i32")(0) == 300);
  CHECK(f.tensor<double, 1>("as_f64")(0) == 300.0);
  SafetensorsWriter bad_utf8;
  bad_utf8.set_metadata("k", std::string("\xff\xfe"));
  CHECK_THROWS_AS(bad_utf8.to_bytes(), ValueError);
}

TEST_CASE("safetensors reader rejects every malformed layout with a precise IoError", "[io][safetensors][errors]") {
  const std::string ok_entry = R"({"dtype":"F32","shape":[2],"data_offsets":[0,8]})";
  SECTION("valid baseline") {
    CHECK_NOTHROW(SafetensorsFile(build_file(R"({"a":)" + ok_entry + "}", std::vector<std::uint8_t>(8)), "ok"));
    CHECK_NOTHROW(SafetensorsFile(build_file("{}", {}), "empty"));
    CHECK_NOTHROW(SafetensorsFile(build_file("{}      ", {}), "padded"));
  }
  SECTION("file and header length") {
    expect_bad(std::vector<std::uint8_t>{1, 2, 3}, "shorter than the 8-byte header length");
    expect_bad(build_file("{}", std::vector<std::uint8_t>(10), /*declared_len=*/100), "exceeds the 12 bytes that follow");
    expect_bad(build_file("{}", {}, /*declared_len=*/200000000), "exceeds the limit of 100000000 bytes");
    expect_bad(build_file("{}", {}, /*declared_len=*/~std::uint64_t{0} - 3), "header length");
  }
  SECTION("JSON structure") {
    expect_bad(R"({"a": )", 0, "is not well-formed JSON");
    expect_bad(std::string("{\"a\xff\": 1}"), 0, "is not well-formed JSON");  // ill-formed UTF-8
    expect_bad("", 0, "is not well-formed JSON");
    expect_bad("[1, 2]", 0, "must be a JSON object, got a JSON array");
    expect_bad(" {}", 0, "must begin with '{'");
    expect_bad(R"({"a":)" + ok_entry + R"(,"a":)" + ok_entry + "}", 8, "duplicate key 'a'");
    expect_bad(R"({"a":{"dtype":"F32","dtype":"F32","shape":[2],"data_offsets":[0,8]}})", 8,
               "duplicate key 'dtype' in the header (inside 'a')");
  }
  SECTION("entry fields") {
    expect_bad(R"({"a": 3})", 0, "tensor 'a': the entry must be a JSON object");
    expect_bad(R"({"a":{"shape":[2],"data_offsets":[0,8]}})", 8, "tensor 'a': missing key \"dtype\"");
    expect_bad(R"({"a":{"dtype":"F32","data_offsets":[0,8]}})", 8, "missing key \"shape\"");
    expect_bad(R"({"a":{"dtype":"F32","shape":[2]}})", 8, "missing key \"data_offsets\"");
    expect_bad(R"({"a":{"dtype":5,"shape":[2],"data_offsets":[0,8]}})", 8, "\"dtype\" must be a string");
    expect_bad(R"({"a":{"dtype":"F32","shape":2,"data_offsets":[0,8]}})", 8, "\"shape\" must be an array");
    expect_bad(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0]}})", 8,
               "\"data_offsets\" must be an array of two non-negative integers");
    expect_bad(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":"0,8"}})", 8, "\"data_offsets\" must be an array");
    expect_bad(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[-8,8]}})", 8, "two non-negative integers");
    expect_bad(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8.0]}})", 8, "two non-negative integers");
  }
  SECTION("dtype and shape values") {
    expect_bad(R"({"a":{"dtype":"F8","shape":[2],"data_offsets":[0,8]}})", 8, "tensor 'a': unknown dtype \"F8\"");
    expect_bad(R"({"a":{"dtype":"F32","shape":[-2],"data_offsets":[0,8]}})", 8, "shape[0] = -2 is negative");
    expect_bad(R"({"a":{"dtype":"F32","shape":[1,2.5],"data_offsets":[0,8]}})", 8,
               "shape[1] must be a non-negative integer, got 2.5");
    expect_bad(R"({"a":{"dtype":"F32","shape":["2"],"data_offsets":[0,8]}})", 8, "shape[0] must be a non-negative");
  }
  SECTION("overflow-safe sizes") {
    expect_bad(R"({"a":{"dtype":"F64","shape":[1099511627776,1099511627776],"data_offsets":[0,8]}})", 8,
               "more elements than a 64-bit index can count");
    expect_bad(R"({"a":{"dtype":"F64","shape":[2305843009213693952],"data_offsets":[0,8]}})", 8,
               "needs more bytes than a 64-bit offset can address");
    expect_bad(R"({"a":{"dtype":"F64","shape":[18446744073709551615],"data_offsets":[0,8]}})", 8,
               "more elements than a 64-bit index can count");
    // 2^61 * 8 wraps to 0 in 64-bit arithmetic: an unchecked reader would accept an empty span.
    expect_bad(R"({"a":{"dtype":"F64","shape":[2305843009213693952],"data_offsets":[0,0]}})", 0, "needs more bytes");
  }
  SECTION("offsets") {
    expect_bad(R"({"a":{"dtype":"F32","shape":[0],"data_offsets":[8,4]}})", 8, "data_offsets [8, 4] have begin > end");
    expect_bad(R"({"a":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}})", 8,
               "data_offsets [0, 16] reach past the end of the data block, which has 8 bytes");
    expect_bad(R"({"a":{"dtype":"F32","shape":[2,3],"data_offsets":[0,20]}})", 24,
               "shape (2, 3) of F32 needs 24 bytes, but data_offsets [0, 20] span 20");
  }
  SECTION("coverage of the data block") {
    expect_bad(R"({"a":{"dtype":"F32","shape":[3],"data_offsets":[0,12]},"b":{"dtype":"F32","shape":[2],"data_offsets":[8,16]}})",
               16, "tensor 'b' (data_offsets [8, 16]) overlaps tensor 'a' (data_offsets [0, 12])");
    expect_bad(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}})",
               8, "overlaps tensor");
    expect_bad(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[2],"data_offsets":[12,20]}})",
               20, "gap of 4 bytes before tensor 'b'");
    expect_bad(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[2],"data_offsets":[12,20]}})",
               20, "cover the data block exactly, without gaps");
    expect_bad(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[8,16]}})", 16, "gap of 8 bytes before tensor 'a'");
    expect_bad(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}})", 12,
               "4 trailing bytes after the last tensor");
    expect_bad("{}", 3, "requires the tensors to cover the data block exactly");
    // Zero-size tensors at the cursor are fine.
    CHECK_NOTHROW(SafetensorsFile(
        build_file(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"z":{"dtype":"F32","shape":[0,5],"data_offsets":[8,8]}})",
                   std::vector<std::uint8_t>(8)),
        "ok"));
  }
  SECTION("metadata") {
    expect_bad(R"({"__metadata__": [1]})", 0, "\"__metadata__\" must be a JSON object mapping strings to strings");
    expect_bad(R"({"__metadata__": {"k": 3}})", 0, "key 'k' has a JSON number value");
    expect_bad(R"({"__metadata__": {"k": {"nested": "x"}}})", 0, "key 'k' has a JSON object value");
    const SafetensorsFile ok(build_file(R"({"__metadata__": {"k": "v"}})", {}), "ok");
    CHECK(ok.metadata_value("k") == "v");
    CHECK(ok.size() == 0);
  }
  SECTION("file-level messages name the path") {
    testing::TempDir dir("sma_io_test");
    const std::string p = dir.file("trunc.safetensors");
    const auto bytes = build_file(R"({"a":)" + ok_entry + "}", std::vector<std::uint8_t>(8));
    write_file_atomic(p, bytes.data(), bytes.size() - 3);  // truncated in the data block
    CHECK_THROWS_AS(SafetensorsFile(p), IoError);
    CHECK_THROWS_WITH(SafetensorsFile(p), Contains(p) && Contains("reach past the end of the data block"));
    CHECK_THROWS_WITH(SafetensorsFile(dir.file("absent.safetensors")),
                      Contains("absent.safetensors") && Contains("cannot open"));
    CHECK_THROWS_WITH(SafetensorsFile(dir.path().string()), Contains("not a regular file"));
  }
}

TEST_CASE("safetensors reader survives random corruption: IoError or a consistent file, never a crash",
          "[io][safetensors][errors]") {
  Tensor2<float> a(3, 4);
  a.setConstant(0.5f);
  Tensor1<std::int64_t> b(5);
  b.setConstant(-3);
  Tensor1<std::uint8_t> c(7);
  c.setConstant(1);
  SafetensorsWriter w;
  w.add("a", a).add("b", b).add("c", c).add("h", a, DType::BF16).set_metadata("case", "fuzz");
  const auto good = w.to_bytes();
  std::uint64_t state = 0x9E3779B97F4A7C15ull;
  auto next = [&state] {
    state ^= state << 13;
    state ^= state >> 7;
    state ^= state << 17;
    return state;
  };
  int rejected = 0, accepted = 0;
  for (int iter = 0; iter < 3000; ++iter) {
    auto bytes = good;
    const int edits = 1 + static_cast<int>(next() % 3);
    for (int e = 0; e < edits; ++e) {
      // Mostly the length prefix and the header, where the structure lives.
      const std::size_t limit = next() % 4 == 0 ? bytes.size() : std::min<std::size_t>(bytes.size(), 8 + 200);
      bytes[next() % limit] = static_cast<std::uint8_t>(next());
    }
    if (next() % 8 == 0) bytes.resize(next() % bytes.size());
    try {
      const SafetensorsFile f(bytes, "fuzz");
      ++accepted;
      for (const auto& name : f.names()) {
        const auto v = f.values_as_double(name);
        REQUIRE(v.size() == static_cast<std::size_t>(f.info(name).numel()));
        REQUIRE(f.raw(name).size == f.info(name).nbytes());
      }
    } catch (const IoError&) {
      ++rejected;
    }
  }
  CHECK(rejected > 1000);
  CHECK(accepted > 0);  // edits inside the data block leave a valid file
}

TEST_CASE("safetensors saves are atomic: a failed save leaves the old file and no temporary file", "[io][atomic]") {
  testing::TempDir dir("sma_io_test");
  const std::string path = dir.file("model.safetensors");
  Tensor2<double> v1(4, 4), v2(64, 64);
  v1.setConstant(1.0);
  v2.setConstant(2.0);
  SafetensorsWriter first;
  first.add("w", v1).set_metadata("version", "1");
  first.save(path);
  const auto original = file_bytes(path);
  SafetensorsWriter second;
  second.add("w", v2).set_metadata("version", "2");

  SECTION("a write failing midway (testing hook)") {
    AtomicWriteOptions opt;
    opt.fail_after_bytes = 100;
    CHECK_THROWS_AS(second.save(path, opt), IoError);
    CHECK_THROWS_WITH(second.save(path, opt),
                      Contains(path) && Contains("failed after 100 of") && Contains("existing file, if any, is unchanged"));
    CHECK(file_bytes(path) == original);
    CHECK_FALSE(fs::exists(temp_path_for(path)));
    CHECK(SafetensorsFile(path).metadata_value("version") == "1");
    opt.fail_after_bytes = 0;  // failing before the first byte
    CHECK_THROWS_AS(second.save(path, opt), IoError);
    CHECK(file_bytes(path) == original);
    CHECK_FALSE(fs::exists(temp_path_for(path)));
  }
  SECTION("the rename failing (the target is a folder)") {
    const std::string folder = dir.file("taken");
    fs::create_directory(folder);
    fs::create_directory(folder + "/inner");  // a non-empty folder cannot be replaced by a file
    CHECK_THROWS_AS(second.save(folder), IoError);
    CHECK_THROWS_WITH(second.save(folder), Contains("cannot rename"));
    CHECK(fs::is_directory(folder + "/inner"));
    CHECK_FALSE(fs::exists(temp_path_for(folder)));
  }
  SECTION("the folder does not exist") {
    CHECK_THROWS_WITH(second.save(dir.file("no/such/folder/m.safetensors")),
                      Contains("cannot create the temporary file"));
  }
  SECTION("a read-only folder") {
    if (::geteuid() == 0) {
      WARN("running as root: permission bits do not stop root, the read-only-folder case is not exercised");
    } else {
      fs::permissions(dir.path(), fs::perms::owner_read | fs::perms::owner_exec, fs::perm_options::replace);
      CHECK_THROWS_AS(second.save(path), IoError);
      fs::permissions(dir.path(), fs::perms::owner_all, fs::perm_options::replace);
      CHECK(file_bytes(path) == original);
      CHECK_FALSE(fs::exists(temp_path_for(path)));
    }
  }
  SECTION("a successful save replaces the file") {
    second.save(path);
    CHECK_FALSE(fs::exists(temp_path_for(path)));
    const SafetensorsFile f(path);
    CHECK(f.metadata_value("version") == "2");
    CHECK(f.tensor<double, 2>("w")(63, 63) == 2.0);
  }
}

TEST_CASE("golden safetensors files load with their documented names, shapes, dtypes and metadata",
          "[io][safetensors][golden]") {
  const std::string dir = golden_dir();
  if (!fs::is_directory(dir)) {
    WARN("golden folder " << dir << " not found (set SMA_GOLDEN_DIR); golden reading not tested");
    return;
  }
  const std::string ema = dir + "/ema_causal.safetensors";
  if (!fs::exists(ema)) {
    WARN(ema << " not found; golden reading not tested");
    return;
  }
  const SafetensorsFile f(ema);
  CHECK(f.metadata_value("case") == "ema_causal");
  CHECK(f.metadata_value("format") == "seqboat-golden-v1");
  CHECK(f.metadata_value("kind") == "ema");
  const auto config = nlohmann::json::parse(f.metadata_value("config"));
  CHECK(config["embed_dim"] == 16);
  CHECK(config["bidirectional"] == false);
  const Index B = std::stol(f.metadata_value("batch")), L = std::stol(f.metadata_value("seq_len"));
  const Index D = config["embed_dim"].get<Index>();
  for (const char* name : {"input", "output", "grad_output", "grad.input"}) {
    INFO(name);
    CHECK(f.info(name).dtype == DType::F64);
    CHECK(f.info(name).shape == std::vector<Index>{L, B, D});  // time-major, as the README says
  }
  CHECK(f.info("omega").shape == std::vector<Index>{D});
  CHECK(f.info("gamma").shape.size() == 2);
  const auto x = f.tensor<double, 3>("input", {L, B, D});
  double norm = 0;
  for (Index i = 0; i < x.size(); ++i) {
    REQUIRE(std::isfinite(x.data()[i]));
    norm += x.data()[i] * x.data()[i];
  }
  CHECK(norm > 0);
  const auto xf = f.tensor<float, 3>("input");
  CHECK(xf(1, 2, 3) == static_cast<float>(x(1, 2, 3)));

  // Every golden file passes the strict validation, and U8 / I64 tensors load where present.
  int files = 0, u8 = 0, i64 = 0;
  for (const auto& entry : fs::directory_iterator(dir)) {
    if (entry.path().extension() != ".safetensors") continue;
    INFO(entry.path().string());
    const SafetensorsFile g(entry.path().string());
    ++files;
    CHECK(g.has_metadata("case"));
    CHECK(g.metadata_value("case") == entry.path().stem().string());
    for (const auto& name : g.names()) {
      const auto& ti = g.info(name);
      if (ti.dtype == DType::U8) {
        ++u8;
        for (auto v : g.values<std::uint8_t>(name)) REQUIRE(v <= 1);  // masks and flags
      } else if (ti.dtype == DType::I64) {
        ++i64;
        CHECK_NOTHROW(g.values<std::int64_t>(name));
      }
    }
  }
  CHECK(files >= 1);
  INFO("U8 tensors: " << u8 << ", I64 tensors: " << i64);
  CHECK(files > 0);
}

TEST_CASE("a file from the official safetensors library reads back, and torch's bf16/f16 rounding equals ours",
          "[io][safetensors][interop]") {
  const SafetensorsFile f(from_hex(kOfficialSafetensorsHex), "official.safetensors");
  CHECK(f.metadata_value("case") == "theirs");
  CHECK(f.size() == 7);
  CHECK(f.info("i64").begin == 0);  // alignment order, accepted: only the exact cover matters
  const auto f32 = f.tensor<double, 2>("f32", {2, 5});
  for (Index i = 0; i < 10; ++i) CHECK(f32.data()[i] == (i % 7) * 0.5 - 1.25);
  for (const char* name : {"bf16", "f16"}) {
    const auto v = f.values_as_double(name);
    REQUIRE(v.size() == 6);
    for (std::size_t i = 0; i < 6; ++i) CHECK(v[i] == static_cast<double>(i % 7) * 0.5 - 1.25);
  }
  CHECK(f.values<std::int64_t>("i64") == std::vector<std::int64_t>{-5, -2, 1, 4});
  CHECK(f.values<bool>("bool") == std::vector<bool>{true, false, false, true, false});
  const ByteView bf = f.raw("bf16_round"), hf = f.raw("f16_round");
  REQUIRE(bf.size == 80);
  REQUIRE(hf.size == 80);
  for (std::size_t i = 0; i < 40; ++i) {
    const float src = static_cast<float>((static_cast<double>(i) + 1.0) / 3.0 * (i % 2 ? -1.0 : 1.0) *
                                         std::pow(10.0, static_cast<double>(i % 5) - 2.0));
    INFO("i = " << i << ", value " << src);
    CHECK((bf.data[2 * i] | (bf.data[2 * i + 1] << 8)) == float_to_bf16(src));
    CHECK((hf.data[2 * i] | (hf.data[2 * i + 1] << 8)) == float_to_half(src));
  }
}
