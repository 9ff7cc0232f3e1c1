// sma-golden --device cuda: runs a golden case through the CUDA backend (float32) and compares with the stored
// results like run_case does (eval mode). Only compiled when the backend is built (SMA_WITH_CUDA). Cases: ema
// (sma::cuda EMA), layer (SeqBoatLayerDevice, batchnorm included: output, grad.input, every parameter gradient, the
// activation mask and the per-row counts; the other intermediates stay on the device) and model
// (SeqBoatModelDevice: logits, grad.input, every parameter gradient, each layer's activation mask). relpos cases
// are SKIPPED with the reason.
#pragma once

#include "../golden_case.hpp"

#include <sma/cuda/buffer.hpp>
#include <sma/cuda/device.hpp>
#include <sma/cuda/ema.hpp>
#include <sma/cuda/seqboat_layer.hpp>
#include <sma/cuda/seqboat_model.hpp>

#include <map>
#include <string>
#include <vector>

namespace sma::golden {

namespace detail {

inline std::vector<float> host_vector(const Tensor3<float>& t) { return std::vector<float>(t.data(), t.data() + t.size()); }

inline std::vector<std::uint8_t> padding_flat(const Mask& pad) {
  return std::vector<std::uint8_t>(pad.data(), pad.data() + pad.size());
}

inline Tensor3<float> download3(const cuda::DeviceArray<float>& a, Index B, Index L, Index D) {
  Tensor3<float> t(B, L, D);
  const std::vector<float> v = a.download();
  std::copy(v.begin(), v.end(), t.data());
  return t;
}

}  // namespace detail

inline CaseResult run_case_cuda(const std::string& path, const RunOptions& opt = {}) {
  CaseResult res;
  res.name = path;
  try {
    io::SafetensorsFile f(path);
    res.name = f.metadata().count("case") ? f.metadata_value("case") : path;
    res.kind = f.metadata_value("kind");
    const nlohmann::json cfg = nlohmann::json::parse(f.metadata_value("config"));
    detail::Checker check(f, res, opt);
    io::LoadOptions lo;
    lo.ignore = detail::is_case_tensor;
    const Mask pad = detail::load_padding<float>(f);
    cuda::DeviceArray<std::uint8_t> d_pad(pad.size() ? detail::padding_flat(pad) : std::vector<std::uint8_t>{});
    const std::uint8_t* pad_ptr = pad.size() ? d_pad.data() : nullptr;
    cuda::Stream stream;

    if (res.kind == "ema") {
      typename MultiHeadEma<float>::Config ec;
      ec.dim = cfg.at("embed_dim").get<Index>();
      ec.ndim = cfg.at("ndim").get<Index>();
      ec.direction = cfg.value("bidirectional", false) ? Direction::bidirectional : Direction::causal;
      ec.truncation = cfg.contains("truncation") && !cfg["truncation"].is_null() ? cfg["truncation"].get<Index>() : 0;
      MultiHeadEma<float> ema(ec);
      io::load_state_dict(ema, f, lo);
      const Tensor3<float> x = detail::to_batch_first(f.tensor<float, 3>("input"));
      const Tensor3<float> g = detail::to_batch_first(f.tensor<float, 3>("grad_output"));
      const Index B = x.dimension(0), L = x.dimension(1), D = x.dimension(2);
      std::map<std::string, Param<float>*> prm;
      ema.visit_params([&](const auto& name, Param<float>& p) { prm[std::string(name)] = &p; });
      std::map<std::string, cuda::DeviceArray<float>> val, grad;
      for (auto& [name, p] : prm) {
        val.emplace(name, cuda::DeviceArray<float>(std::vector<float>(p->data(), p->data() + p->size())));
        grad.emplace(name, cuda::DeviceArray<float>(std::vector<float>(static_cast<std::size_t>(p->size()), 0.f)));
      }
      cuda::EmaConfig c;
      c.batch = static_cast<int>(B);
      c.length = static_cast<int>(L);
      c.dim = static_cast<int>(D);
      c.order = static_cast<int>(ec.ndim);
      c.bidirectional = ec.direction == Direction::bidirectional;
      c.truncation = static_cast<int>(ec.truncation);
      cuda::DeviceArray<float> d_x(detail::host_vector(x)), d_g(detail::host_vector(g));
      cuda::DeviceArray<float> d_y(static_cast<std::size_t>(x.size())), d_dx(static_cast<std::size_t>(x.size()));
      const cuda::EmaParams p{val.at("delta").data(), val.at("alpha").data(), val.at("beta").data(),
                              val.at("gamma").data(), val.at("omega").data()};
      const cuda::EmaGrads gr{grad.at("delta").data(), grad.at("alpha").data(), grad.at("beta").data(),
                              grad.at("gamma").data(), grad.at("omega").data()};
      cuda::ema_forward(c, p, d_x.data(), pad_ptr, d_y.data(), stream.handle());
      cuda::ema_backward(c, p, d_x.data(), pad_ptr, d_g.data(), d_dx.data(), gr, stream.handle());
      stream.synchronize();
      check.compare("output", detail::flat_time_major(detail::download3(d_y, B, L, D)));
      check.compare("grad.input", detail::flat_time_major(detail::download3(d_dx, B, L, D)));
      for (auto& [name, p] : prm) {
        const std::vector<float> v = grad.at(name).download();
        check.compare("grad." + name, std::vector<double>(v.begin(), v.end()));
      }
    } else if (res.kind == "layer") {
      const SeqBoatLayerConfig lc = SeqBoatLayerConfig::from_reference_json(cfg);
      SeqBoatLayer<float> layer(lc);
      io::load_state_dict(layer, f, lo);
      const Tensor3<float> x = detail::to_batch_first(f.tensor<float, 3>("input"));
      const Tensor3<float> g = detail::to_batch_first(f.tensor<float, 3>("grad_output"));
      const Index B = x.dimension(0), L = x.dimension(1), D = x.dimension(2);
      cuda::SeqBoatLayerDevice dev = cuda::SeqBoatLayerDevice::from_cpu(layer, /*dropout_as_eval=*/true);
      dev.set_training(false);
      cuda::DeviceArray<float> d_x(detail::host_vector(x)), d_g(detail::host_vector(g));
      cuda::DeviceArray<float> d_y(static_cast<std::size_t>(x.size())), d_dx(static_cast<std::size_t>(x.size()));
      dev.forward(static_cast<int>(B), static_cast<int>(L), d_x.data(), pad_ptr, d_y.data(), stream.handle());
      dev.backward(d_g.data(), d_dx.data(), stream.handle());
      stream.synchronize();
      check.compare("output", detail::flat_time_major(detail::download3(d_y, B, L, D)));
      const std::vector<std::uint8_t> act = dev.active();
      check.compare_exact("inter.activation_mask", std::vector<double>(act.begin(), act.end()));
      const std::vector<int> num = dev.plan().num_active();
      check.compare_exact("inter.num_active", std::vector<double>(num.begin(), num.end()));
      check.compare_exact("inter.compress", {dev.plan().compressed() ? 1.0 : 0.0});
      check.compare("grad.input", detail::flat_time_major(detail::download3(d_dx, B, L, D)));
      zero_grad(layer);
      dev.add_grads_to(layer);
      detail::compare_grads<float>(layer, check);
    } else if (res.kind == "model") {
      SeqBoatModel<float> model(SeqBoatModelConfig::from_reference_json(cfg));
      io::load_state_dict(model, f, lo);
      const Tensor3<float> x = f.tensor<float, 3>("input");
      const Tensor2<float> g = f.tensor<float, 2>("grad_output");
      const Index B = x.dimension(0), L = x.dimension(1), Di = x.dimension(2), C = g.dimension(1);
      cuda::SeqBoatModelDevice dev = cuda::SeqBoatModelDevice::from_cpu(model, /*dropout_as_eval=*/true);
      dev.set_training(false);
      cuda::DeviceArray<float> d_x(detail::host_vector(x));
      cuda::DeviceArray<float> d_g(std::vector<float>(g.data(), g.data() + g.size()));
      cuda::DeviceArray<float> d_y(static_cast<std::size_t>(B * C)), d_dx(static_cast<std::size_t>(x.size()));
      dev.forward(static_cast<int>(B), static_cast<int>(L), d_x.data(), pad_ptr, d_y.data(), stream.handle());
      dev.backward(d_g.data(), d_dx.data(), stream.handle());
      stream.synchronize();
      Tensor2<float> y(B, C);
      const std::vector<float> yv = d_y.download();
      std::copy(yv.begin(), yv.end(), y.data());
      check.compare("output", detail::flat(y));
      for (int i = 0; i < dev.n_layers(); ++i) {
        const std::vector<std::uint8_t> act = dev.layer(i).active(stream.handle());
        check.compare_exact(str_cat("inter.seq_layers.", i, ".activation_mask"),
                            std::vector<double>(act.begin(), act.end()));
      }
      Tensor3<float> dx(B, L, Di);
      const std::vector<float> dxv = d_dx.download();
      std::copy(dxv.begin(), dxv.end(), dx.data());
      check.compare("grad.input", detail::flat(dx));
      zero_grad(model);
      dev.add_grads_to(model);
      detail::compare_grads<float>(model, check);
    } else {
      res.skipped = true;
      res.note = str_cat("kind '", res.kind, "' is not run on the device");
      return res;
    }
    if (res.comparisons.empty()) {
      res.ok = false;
      res.failure = "nothing was compared (no output tensor in the file?)";
    }
  } catch (const std::exception& e) {
    res.ok = false;
    res.failure = str_cat("error: ", e.what());
  }
  return res;
}

}  // namespace sma::golden
