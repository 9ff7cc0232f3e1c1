// Training end to end: a tiny SeqBoat classifier learns a small Fashion-MNIST slice; checkpoints round-trip, resume
// exactly, survive a killed or failed save, and say which tensor is wrong; PyTorch-layout state_dicts load;
// data-parallel shards compute the whole batch's gradient deterministically; Embedding is checked against loops.
#include <catch2/catch.hpp>

#include <sma/data/mnist.hpp>
#include <sma/io/safetensors.hpp>
#include <sma/layers/embedding.hpp>
#include <sma/models/seqboat.hpp>
#include <sma/train/batches.hpp>
#include <sma/train/checkpoint.hpp>
#include <sma/train/token_classifier.hpp>
#include <sma/train/trainer.hpp>

#include <cmath>
#include <csignal>
#include <cstdio>
#include <filesystem>
#include <random>
#include <string>
#include <sys/types.h>
#include <sys/wait.h>
#include <thread>
#include <unistd.h>
#include <vector>

using namespace sma;
namespace fs = std::filesystem;

namespace {

using Model = SeqBoatModel<float>;
using Task = train::ClassificationTask<Model>;

std::string temp_file(const std::string& name) {
  const fs::path dir = fs::temp_directory_path() / str_cat("sma_test_train_", ::getpid());
  fs::create_directories(dir);
  return (dir / name).string();
}

SeqBoatModelConfig tiny_config(Index d_input, Index classes, Index length, double dropout = 0.0) {
  SeqBoatModelConfig c;
  c.d_input = d_input;
  c.d_output = classes;
  c.d_model = 16;
  c.n_layers = 1;
  c.d_qk = 8;
  c.d_ema = 4;
  c.mem_size = 8;
  c.dropout = dropout;
  c.prenorm = true;
  c.norm_type = NormType::layernorm;
  c.max_positions = length;
  c.routing = RoutingSemantics::per_row;
  return c;
}

/// 4 classes of noisy sequences, each with a bump in its own quarter: a task any sequence model learns fast.
data::Dataset synthetic(Index n, Index length, std::uint64_t seed) {
  data::Dataset d;
  d.name = "synthetic";
  d.num_classes = 4;
  d.feature_dim = 2;
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> noise(0.f, 0.5f);
  for (Index i = 0; i < n; ++i) {
    data::Example e;
    e.label = static_cast<std::int64_t>(i % 4);
    for (Index t = 0; t < length; ++t) {
      const bool bump = t / (length / 4) == e.label;
      e.values.push_back(noise(rng) + (bump ? 2.f : 0.f));
      e.values.push_back(noise(rng));
    }
    d.examples.push_back(std::move(e));
  }
  return d;
}

/// Fashion-MNIST images as 49 tokens of 4x4 pixels.
data::Dataset fashion_patches(data::Split split, Index limit) {
  data::ImageOptions o;
  o.normalize = true;
  o.limit = limit;
  data::Dataset d = data::load_fashion_mnist(split, o);
  for (auto& e : d.examples) {
    std::vector<float> v(784);
    for (int r = 0; r < 28; ++r)
      for (int c = 0; c < 28; ++c) v[static_cast<std::size_t>(((r / 4) * 7 + c / 4) * 16 + (r % 4) * 4 + c % 4)] = e.values[static_cast<std::size_t>(r * 28 + c)];
    e.values = std::move(v);
  }
  d.feature_dim = 16;
  return d;
}

train::TrainConfig quick_config(Index steps, int threads = 2) {
  train::TrainConfig tc;
  tc.steps = steps;
  tc.lr = 5e-3;
  tc.warmup = 5;
  tc.threads = threads;
  tc.seed = 3;
  return tc;
}

template <class Tr>
train::FitOptions<typename Tr::Batch> quiet_fit(std::function<typename Tr::Batch(Index)> batch) {
  train::FitOptions<typename Tr::Batch> f;
  f.batch = std::move(batch);
  f.progress = false;
  return f;
}

bool same_values(Model& a, Model& b) {
  std::vector<float> va, vb;
  for_each_param(a, [&](const std::string&, Param<float>& p) { va.insert(va.end(), p.data(), p.data() + p.size()); });
  for_each_param(b, [&](const std::string&, Param<float>& p) { vb.insert(vb.end(), p.data(), p.data() + p.size()); });
  return va == vb;
}

}  // namespace

TEST_CASE("a tiny SeqBoat classifier learns: loss well below chance, accuracy well above the majority class",
          "[train][trainer]") {
  data::Dataset train_set, test_set;
  Index length = 0, d_input = 0;
  if (data::find_fashion_mnist_dir()) {
    train_set = fashion_patches(data::Split::train, 2000);
    test_set = fashion_patches(data::Split::test, 500);
    length = 49, d_input = 16;
  } else {
    WARN("Fashion-MNIST not installed (apt-get install dataset-fashion-mnist): training on a synthetic task instead");
    train_set = synthetic(1000, 32, 1);
    test_set = synthetic(400, 32, 2);
    length = 32, d_input = 2;
  }
  const Index classes = train_set.num_classes;
  Model model(tiny_config(d_input, classes, length), 11);
  train::Trainer<Task> tr(model, quick_config(300));
  train::EpochBatches<float> batches(train_set, 16, 3, length);
  tr.fit(quiet_fit<decltype(tr)>([&](Index s) { return batches(s); }));

  const auto& h = tr.history();
  REQUIRE(h.loss.size() == 300);
  double late = 0;
  for (std::size_t i = 250; i < 300; ++i) late += h.loss[i] / 50;
  const double chance = std::log(double(classes));
  INFO("mean training loss over the last 50 steps: " << late << " (chance " << chance << ")");
  CHECK(late < 0.6 * chance);

  train::SequentialBatches<float> eb(test_set, 100, length);
  const train::ShardResult r = tr.evaluate(eb);
  const auto counts = data::class_counts(test_set);
  const double majority = double(*std::max_element(counts.begin(), counts.end())) / double(test_set.size());
  INFO("test accuracy " << r.accuracy() << ", majority class " << majority);
  CHECK(r.counted == test_set.size());
  CHECK(r.accuracy() > majority + 0.4);
  CHECK(r.loss() < 0.6 * chance);
  REQUIRE(r.activity.layers() == 1);
  CHECK(r.activity.real[0] == test_set.size() * length);
}

TEST_CASE("data-parallel shards give the whole batch's loss and gradient, deterministically", "[train][parallel]") {
  const data::Dataset ds = synthetic(24, 32, 5);
  Model base(tiny_config(2, 4, 32, /*dropout=*/0.0), 4);
  const data::Batch<float> batch = data::make_batch<float>(ds, [] {
    std::vector<Index> r(24);
    for (Index i = 0; i < 24; ++i) r[static_cast<std::size_t>(i)] = i;
    return r;
  }(), 32);

  auto grads = [&](int threads, train::Parallelism par, double& loss) {
    Model m = base;
    ParamBuffer<float> buf(m);
    train::DataParallel<Task> dp(m, buf, threads, par);
    buf.zero_grad();
    loss = dp.run(batch, Mode::train, 9, true).loss();
    return std::vector<float>(buf.grads(), buf.grads() + buf.size());
  };
  double l1 = 0, l3 = 0, l3b = 0;
  const auto g1 = grads(1, train::Parallelism::layers, l1);
  const auto g3 = grads(3, train::Parallelism::shards, l3);
  const auto g3b = grads(3, train::Parallelism::shards, l3b);
  CHECK(l3 == l3b);
  CHECK(g3 == g3b);  // bitwise: fixed reduction order
  CHECK(l3 == Approx(l1).epsilon(1e-5));
  double diff = 0, norm = 0;
  for (std::size_t i = 0; i < g1.size(); ++i) {
    diff = std::max(diff, double(std::abs(g1[i] - g3[i])));
    norm = std::max(norm, double(std::abs(g1[i])));
  }
  CHECK(diff <= 1e-4 * norm);

  // A model with BatchNorm buffers runs as one shard whatever is asked.
  SeqBoatModelConfig bn = tiny_config(2, 4, 32);
  bn.norm_type = NormType::batchnorm;
  Model mb(bn, 1);
  ParamBuffer<float> bb(mb);
  train::DataParallel<Task> dp(mb, bb, 2, train::Parallelism::shards);
  CHECK(dp.shards() == 1);
}

TEST_CASE("checkpoint round trip: a fresh model loads identical weights and gives identical outputs",
          "[train][checkpoint]") {
  const data::Dataset ds = synthetic(64, 32, 7);
  Model model(tiny_config(2, 4, 32), 1);
  train::Trainer<Task> tr(model, quick_config(8));
  train::EpochBatches<float> batches(ds, 8, 3, 32);
  tr.fit(quiet_fit<decltype(tr)>([&](Index s) { return batches(s); }));
  const std::string path = temp_file("roundtrip.safetensors");
  tr.save(path, {{"note", "round trip"}});

  Model fresh(tiny_config(2, 4, 32), 99);
  REQUIRE_FALSE(same_values(model, fresh));
  train::Trainer<Task> tr2(fresh, quick_config(8));
  const train::CheckpointInfo info = tr2.resume(path);
  CHECK(info.step == 8);
  CHECK(tr2.step() == 8);
  CHECK(info.get("note") == "round trip");
  CHECK(info.get("format") == train::kCheckpointFormat);
  CHECK(info.get("optimizer") == "adamw");
  CHECK(tr2.history().loss == tr.history().loss);
  CHECK(same_values(model, fresh));

  const data::Batch<float> b = batches(100);
  Context c1(Mode::eval), c2(Mode::eval);
  Model::Cache k1, k2;
  const Tensor2<float> y1 = Task::forward(model, c1, b, k1), y2 = Task::forward(fresh, c2, b, k2);
  REQUIRE(y1.size() == y2.size());
  CHECK(std::equal(y1.data(), y1.data() + y1.size(), y2.data()));

  // Weights alone: the same names, loadable into a third model, and no training state.
  const std::string wpath = temp_file("weights.safetensors");
  train::save_weights(wpath, model);
  const io::SafetensorsFile wf(wpath);
  for (const auto& n : wf.names()) CHECK_FALSE(train::is_training_state_name(n));
  Model third(tiny_config(2, 4, 32), 5);
  train::load_weights(wpath, third);
  CHECK(same_values(model, third));
  // A checkpoint loads as weights too (its optimiser state is skipped).
  Model fourth(tiny_config(2, 4, 32), 6);
  train::load_weights(path, fourth);
  CHECK(same_values(model, fourth));
}

TEST_CASE("a resumed run reproduces the uninterrupted run's losses exactly", "[train][checkpoint][resume]") {
  const data::Dataset ds = synthetic(96, 32, 8);
  const SeqBoatModelConfig cfg = tiny_config(2, 4, 32, /*dropout=*/0.1);  // dropout: the RNG must resume too
  for (auto kind : {train::OptimizerKind::adamw, train::OptimizerKind::radam, train::OptimizerKind::sgd}) {
    CAPTURE(train::to_string(kind));
    train::TrainConfig tc = quick_config(14);
    tc.optimizer.kind = kind;
    tc.lr = kind == train::OptimizerKind::sgd ? 0.05 : 5e-3;
    train::EpochBatches<float> batches(ds, 8, 3, 32);  // 12 batches per epoch: the run crosses an epoch

    Model a(cfg, 21);
    train::Trainer<Task> ta(a, tc);
    ta.fit(quiet_fit<decltype(ta)>([&](Index s) { return batches(s); }));

    const std::string path = temp_file(str_cat("resume_", train::to_string(kind), ".safetensors"));
    Model b(cfg, 21);
    train::Trainer<Task> tb(b, tc);
    auto fb = quiet_fit<decltype(tb)>([&](Index s) { return batches(s); });
    fb.stop_after = 9;
    fb.checkpoint_path = path;
    tb.fit(fb);  // "interrupted" after step 9, checkpoint written
    REQUIRE(tb.step() == 9);

    Model c(cfg, 77);  // another init: everything must come from the file
    train::Trainer<Task> tc2(c, tc);
    tc2.resume(path);
    tc2.fit(quiet_fit<decltype(tc2)>([&](Index s) { return batches(s); }));
    REQUIRE(tc2.history().loss.size() == 14);
    CHECK(tc2.history().loss == ta.history().loss);  // bitwise, steps 1..9 from the file, 10..14 recomputed
    CHECK(tc2.history().grad_norm == ta.history().grad_norm);
    CHECK(same_values(a, c));
  }
}

namespace {

/// A model with one big parameter, for saves that take a while.
struct Big {
  Param<float> w{"w", {1 << 19}};
  template <class V>
  void visit_params(V&& v) {
    v("weight", w);
  }
};

void fill_version(Big& m, optim::Adam<float>& opt, float k) {
  m.w.fill(k);
  opt.visit_state([&](const std::string& name, std::vector<double>& v) {
    if (name != "step") std::fill(v.begin(), v.end(), double(k));
  });
}

/// True when the file at `path` holds one complete version: weight, optimiser state and step all equal k.
bool consistent_version(const std::string& path, float& version) {
  Big m;
  ParamBuffer<float> buf(m);
  optim::Adam<float> opt(buf, {});
  const train::CheckpointInfo info = train::load_checkpoint(path, m, opt);
  version = m.w.data()[0];
  bool ok = info.step == static_cast<Index>(version);
  for (Index i = 0; i < m.w.size(); ++i) ok = ok && m.w.data()[i] == version;
  opt.visit_state([&](const std::string& name, std::vector<double>& v) {
    if (name == "step") return;
    for (double x : v) ok = ok && x == double(version);
  });
  return ok;
}

}  // namespace

TEST_CASE("a save that fails (full disk) leaves the previous checkpoint intact", "[train][checkpoint][atomic]") {
  const std::string path = temp_file("failing.safetensors");
  Big m;
  ParamBuffer<float> buf(m);
  optim::Adam<float> opt(buf, {});
  fill_version(m, opt, 1.f);
  train::save_checkpoint(path, m, opt, 1);
  fill_version(m, opt, 2.f);
  io::AtomicWriteOptions fail;
  fail.fail_after_bytes = 3 << 19;  // the "disk" fills up in the middle of the optimiser state
  CHECK_THROWS_AS(train::save_checkpoint(path, m, opt, 2, {}, fail), IoError);
  float version = 0;
  CHECK(consistent_version(path, version));
  CHECK(version == 1.f);
  CHECK_FALSE(fs::exists(io::temp_path_for(path)));
}

TEST_CASE("a save killed with SIGKILL leaves a checkpoint that loads", "[train][checkpoint][atomic]") {
  const std::string path = temp_file("killed.safetensors");
  {
    Big m;
    ParamBuffer<float> buf(m);
    optim::Adam<float> opt(buf, {});
    fill_version(m, opt, 1.f);
    train::save_checkpoint(path, m, opt, 1);
  }
  int killed_mid_save = 0;
  for (int round = 0; round < 3; ++round) {
    const pid_t child = ::fork();
    REQUIRE(child >= 0);
    if (child == 0) {
      // Saves versions 2, 3, ... as fast as it can until it is killed. No exceptions may escape a forked child.
      try {
        Big m;
        ParamBuffer<float> buf(m);
        optim::Adam<float> opt(buf, {});
        for (int k = 2; k < 1000000; ++k) {
          fill_version(m, opt, float(k));
          train::save_checkpoint(path, m, opt, k);
        }
      } catch (...) {
      }
      ::_exit(0);
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(150 + 70 * round));
    // A save is under way when the temporary file exists: kill then, as a crash would.
    const std::string tmp = path + ".tmp." + std::to_string(child);
    for (int i = 0; i < 2000 && !fs::exists(tmp); ++i) std::this_thread::sleep_for(std::chrono::microseconds(200));
    killed_mid_save += fs::exists(tmp) ? 1 : 0;
    ::kill(child, SIGKILL);
    int status = 0;
    ::waitpid(child, &status, 0);
    CHECK(WIFSIGNALED(status));
    float version = 0;
    CHECK(consistent_version(path, version));  // the file loads and is one whole version, never a mix
    CHECK(version >= 1.f);
    std::error_code ec;
    fs::remove(tmp, ec);  // what a killed save leaves behind
  }
  CHECK(killed_mid_save > 0);
}

TEST_CASE("loading names the missing, mis-shaped, mis-typed or unknown tensor", "[train][checkpoint][errors]") {
  Model model(tiny_config(2, 4, 32), 1);
  ParamBuffer<float> buf(model);
  train::Optimizer<float> opt(buf, {});
  const std::string good = temp_file("good.safetensors");
  train::save_checkpoint(good, model, opt, 3);
  const io::SafetensorsFile f(good);

  // Rewrites the file with `edit` applied to one tensor (or dropping it, or adding one).
  auto rewrite = [&](const std::string& name, const std::string& out, auto&& edit) {
    io::SafetensorsWriter w;
    for (const auto& n : f.names()) {
      const auto& info = f.info(n);
      const io::ByteView raw = f.raw(n);
      if (n == name) {
        edit(w, info);
        continue;
      }
      w.add_raw(n, info.dtype, info.shape, raw.data, raw.size);
    }
    for (const auto& kv : f.metadata()) w.set_metadata(kv.first, kv.second);
    const std::string p = temp_file(out);
    w.save(p);
    return p;
  };
  const std::string target = "seq_layers.0.hx_proj.weight";
  Model other(tiny_config(2, 4, 32), 2);
  ParamBuffer<float> ob(other);  // outlives every section: `other`'s parameters live in it
  train::Optimizer<float> oo(ob, {});
  std::vector<float> before;
  for_each_param(other, [&](const std::string&, Param<float>& p) { before.insert(before.end(), p.data(), p.data() + p.size()); });
  auto unchanged = [&]() {
    std::vector<float> now;
    for_each_param(other, [&](const std::string&, Param<float>& p) { now.insert(now.end(), p.data(), p.data() + p.size()); });
    return now == before;
  };

  SECTION("missing") {
    const std::string p = rewrite(target, "missing.safetensors", [](io::SafetensorsWriter&, const io::TensorInfo&) {});
    CHECK_THROWS_AS(train::load_weights(p, other), KeyError);
    CHECK_THROWS_WITH(train::load_weights(p, other), Catch::Contains("'" + target + "' is missing"));
  }
  SECTION("wrong shape") {
    const std::string p = rewrite(target, "shape.safetensors", [&](io::SafetensorsWriter& w, const io::TensorInfo& i) {
      std::vector<float> z(static_cast<std::size_t>(i.numel()), 0.f);
      w.add(target, z.data(), {i.shape[1], i.shape[0]});
    });
    CHECK_THROWS_AS(train::load_weights(p, other), ShapeError);
    CHECK_THROWS_WITH(train::load_weights(p, other), Catch::Contains("'" + target + "' has shape (16, 18)") &&
                                                          Catch::Contains("expects (18, 16)"));
  }
  SECTION("wrong dtype: an integer tensor for a parameter") {
    const std::string p = rewrite(target, "dtype.safetensors", [&](io::SafetensorsWriter& w, const io::TensorInfo& i) {
      std::vector<std::int32_t> z(static_cast<std::size_t>(i.numel()), 0);
      w.add(target, z.data(), i.shape);
    });
    CHECK_THROWS_AS(train::load_weights(p, other), ValueError);
    CHECK_THROWS_WITH(train::load_weights(p, other), Catch::Contains("'" + target + "' is stored as I32"));
  }
  SECTION("wrong dtype: resuming needs the model's exact dtype") {
    const std::string p = rewrite(target, "f64.safetensors", [&](io::SafetensorsWriter& w, const io::TensorInfo& i) {
      std::vector<double> z(static_cast<std::size_t>(i.numel()), 0.0);
      w.add(target, z.data(), i.shape);
    });
    CHECK_THROWS_WITH(train::load_checkpoint(p, other, oo),
                      Catch::Contains("'" + target + "' is stored as F64 but the model's scalar is F32"));
    train::load_weights(p, other);  // converting is fine for weights
    CHECK(other.layers()[0].hx_proj().weight().data()[0] == 0.f);
    before.clear();
    for_each_param(other, [&](const std::string&, Param<float>& q) { before.insert(before.end(), q.data(), q.data() + q.size()); });
  }
  SECTION("unknown tensor") {
    const std::string p = rewrite("decoder.bias", "extra.safetensors", [&](io::SafetensorsWriter& w, const io::TensorInfo& i) {
      const io::ByteView raw = f.raw("decoder.bias");
      w.add_raw("decoder.bias", i.dtype, i.shape, raw.data, raw.size);
      const float x = 1.f;
      w.add("decoder.extra", &x, {1});
    });
    CHECK_THROWS_WITH(train::load_weights(p, other), Catch::Contains("'decoder.extra' is not a parameter"));
    train::WeightsLoadOptions lenient;
    lenient.allow_extra = true;
    CHECK_NOTHROW(train::load_weights(p, other, lenient));
    before.clear();
    for_each_param(other, [&](const std::string&, Param<float>& q) { before.insert(before.end(), q.data(), q.data() + q.size()); });
  }
  SECTION("optimiser state of the wrong dtype, or of another optimiser") {
    const std::string p = rewrite("optimizer.exp_avg", "optdtype.safetensors", [&](io::SafetensorsWriter& w, const io::TensorInfo& i) {
      std::vector<float> z(static_cast<std::size_t>(i.numel()), 0.f);
      w.add("optimizer.exp_avg", z.data(), i.shape);
    });
    CHECK_THROWS_WITH(train::load_checkpoint(p, other, oo), Catch::Contains("'optimizer.exp_avg' is stored as F32"));
    train::OptimizerConfig sgd;
    sgd.kind = train::OptimizerKind::sgd;
    train::Optimizer<float> os(ob, sgd);
    CHECK_THROWS_WITH(train::load_checkpoint(good, other, os), Catch::Contains("'optimizer.momentum_buffer' is missing"));
    CHECK_THROWS_WITH(train::load_checkpoint(temp_file("nope.safetensors"), other, oo), Catch::Contains("nope.safetensors"));
  }
  SECTION("another model configuration") {
    SeqBoatModelConfig wide = tiny_config(2, 4, 32);
    wide.d_model = 24;
    Model w(wide, 1);
    CHECK_THROWS_AS(train::load_weights(good, w), ShapeError);
  }
  CHECK(unchanged());  // a failed load changes nothing
}

TEST_CASE("a PyTorch state_dict in safetensors loads (official names, float32, int64 counts)", "[train][checkpoint][pytorch]") {
  const std::string golden = std::string(SMA_GOLDEN_DIR_DEFAULT) + "/model_bidir_bn_postnorm.safetensors";
  if (!fs::exists(golden)) {
    WARN("golden case " << golden << " not found: test skipped");
    return;
  }
  const io::SafetensorsFile g(golden);
  // The golden file holds the official model's state_dict next to the case's tensors. Written the way
  // `safetensors.torch.save_file(model.float().state_dict(), path)` would: float32 parameters, int64 counts.
  auto is_case = [](const std::string& n) {
    for (const char* p : {"input", "output", "grad", "inter.", "faithful.", "padding_mask"})
      if (n.rfind(p, 0) == 0) return true;
    return false;
  };
  io::SafetensorsWriter w;
  std::vector<std::string> state_names;
  for (const auto& n : g.names()) {
    if (is_case(n)) continue;
    state_names.push_back(n);
    const auto& info = g.info(n);
    if (info.dtype == io::DType::I64) {
      const io::ByteView raw = g.raw(n);
      w.add_raw(n, info.dtype, info.shape, raw.data, raw.size);
    } else {
      const std::vector<float> v = g.values<float>(n);
      w.add(n, v.data(), info.shape);
    }
  }
  const std::string path = temp_file("pytorch_state_dict.safetensors");
  w.save(path);

  const nlohmann::json cfg = nlohmann::json::parse(g.metadata_value("config"));
  Model model(SeqBoatModelConfig::from_reference_json(cfg));
  train::load_weights(path, model);

  Context ctx(Mode::eval);
  Mask pad;
  if (g.contains("padding_mask")) {
    pad = g.tensor<std::uint8_t, 2>("padding_mask");
    ctx.padding = &pad;
  }
  const Tensor3<float> x = g.tensor<float, 3>("input");
  Model::Cache cache;
  const Tensor2<float> y = model.forward(ctx, x, cache);
  const std::vector<double> ref = g.values<double>("output");
  REQUIRE(static_cast<std::size_t>(y.size()) == ref.size());
  double scale = 0, err = 0;
  for (std::size_t i = 0; i < ref.size(); ++i) {
    scale = std::max(scale, std::abs(ref[i]));
    err = std::max(err, std::abs(double(y.data()[i]) - ref[i]));
  }
  CHECK(err <= 1e-4 * scale);

  // Our files use exactly the official keys and PyTorch's dtypes, so the reverse direction works too.
  const std::string ours = temp_file("ours.safetensors");
  train::save_weights(ours, model);
  const io::SafetensorsFile of(ours);
  CHECK(of.names() == state_names);
  for (const auto& n : of.names())
    CHECK(io::to_string(of.info(n).dtype) == std::string(n.find("num_batches_tracked") != std::string::npos ? "I64" : "F32"));
}

TEST_CASE("Embedding looks rows up, scatter-adds gradients, and rejects bad ids", "[train][embedding]") {
  Embedding<double> e({5, 3, /*padding_idx=*/0}, 2);
  for (Index j = 0; j < 3; ++j) CHECK(e.weight().mat()(0, j) == 0.0);
  Tensor2<std::int32_t> ids(2, 3);
  ids.setValues({{1, 4, 1}, {0, 2, 4}});
  Context ctx;
  Embedding<double>::Cache c;
  const Tensor3<double> y = e.forward(ctx, ids, c);
  for (Index b = 0; b < 2; ++b)
    for (Index t = 0; t < 3; ++t)
      for (Index j = 0; j < 3; ++j) CHECK(y(b, t, j) == e.weight().mat()(ids(b, t), j));
  Tensor3<double> dy(2, 3, 3);
  dy.setRandom();
  e.weight().zero_grad();
  e.backward(ctx, dy, c);
  for (Index v = 0; v < 5; ++v)
    for (Index j = 0; j < 3; ++j) {
      double want = 0;
      for (Index b = 0; b < 2; ++b)
        for (Index t = 0; t < 3; ++t)
          if (ids(b, t) == v && v != 0) want += dy(b, t, j);
      CHECK(e.weight().grad_mat()(v, j) == Approx(want).margin(1e-15));
    }
  ids(1, 2) = 5;
  CHECK_THROWS_WITH(e.forward(ctx, ids, c), Catch::Contains("token id 5 at (1, 2)"));
  CHECK_THROWS_AS(Embedding<float>({0, 3}), ValueError);
}

TEST_CASE("TokenClassifier: official names behind an embedding, and it trains on token data", "[train][trainer]") {
  train::TokenClassifierConfig tc;
  tc.vocab_size = 6;
  tc.padding_idx = 0;
  tc.model = tiny_config(8, 2, 24);
  train::TokenClassifier<float> model(tc, 3);
  std::vector<std::string> names;
  for_each_param(model, [&](const std::string& n, Param<float>&) { names.push_back(n); });
  CHECK(names.front() == "embedding.weight");
  CHECK(std::find(names.begin(), names.end(), "decoder.weight") != names.end());
  CHECK(train::TokenClassifierConfig::from_json(tc.to_json()).to_json() == tc.to_json());

  // Label 1 when token 5 occurs anywhere; variable lengths, padded batches.
  data::Dataset ds;
  ds.vocab_size = 6;
  ds.num_classes = 2;
  std::mt19937_64 rng(4);
  for (int i = 0; i < 256; ++i) {
    data::Example e;
    const int len = 8 + static_cast<int>(rng() % 16);
    for (int t = 0; t < len; ++t) e.tokens.push_back(1 + static_cast<std::int32_t>(rng() % 4));
    e.label = i % 2;
    if (e.label) e.tokens[rng() % static_cast<std::size_t>(len)] = 5;
    ds.examples.push_back(std::move(e));
  }
  train::Trainer<train::ClassificationTask<train::TokenClassifier<float>>> tr(model, quick_config(150));
  train::EpochBatches<float> batches(ds, 16, 1, 24, data::PadTo::longest);
  tr.fit(quiet_fit<decltype(tr)>([&](Index s) { return batches(s); }));
  train::SequentialBatches<float> eb(ds, 64, 24, data::PadTo::longest);
  const train::ShardResult r = tr.evaluate(eb);
  CHECK(r.accuracy() > 0.8);
}
