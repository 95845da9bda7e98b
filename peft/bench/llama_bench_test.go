package bench

// Llama benchmarks: the fine-tuning methods on a causal language model, next-token loss on random
// token batches of 8 × 128, on two models:
//
//   - stories260K: the embedded pretrained model (hidden 64, 5 layers, tied head), so small that
//     per-operation overhead dominates;
//   - medium: random init (seed 1), hidden 512, intermediate 1376, 8 layers, 8/8 heads,
//     vocabulary 512, untied head (25.8M parameters): compute-bound, the shape of the PyTorch
//     peer's CPU table (/work/shared/peers: torch_peft_bench.py --models medium), so that the
//     numbers compare side by side.
//
// The methods are the peer's: full fine-tuning, LoRA on q_proj,v_proj (r=8, α=8), LoRA on every
// linear layer but the head (r=8, α=8), a Pfeiffer adapter (reduction 16) and prompt tuning
// (20 virtual tokens), all with AdamW at learning rate 1e-3.
//
// Each benchmark prints a summary table after its sub-benchmarks (ms per step and the ratio to
// full fine-tuning, or ms per forward pass and the ratio to the base model), so one run gives
// the ratios. Compare ratios measured in one run: these machines are noisy.
//
// One command runs both models, every method, and prints the summary tables (ms per step or
// call, tokens/s, the matrix products' GFLOP/s and the machine's load average beside each row):
//
//	PEFT_BENCH_MODELS=stories260K,medium go test -run '^$' -bench Llama -benchtime 3x -timeout 30m ./peft/bench/
//
// and the PyTorch peer's figures for the same work come from
//
//	/usr/bin/python3 ../shared/peers/torch_peft_bench.py --quick --models stories260K,medium
//
// (see the README's performance table, which gives both as ratios measured in one window).
//
// Time. On the pure-Go backend with OpenBLAS (see peft/backend: ops in parallel, matmuls through
// BLAS) the command above takes about four minutes on the 2-core development machine: a
// stories260K step takes about 0.1 s, a medium step 1–1.5 s. Without a BLAS library a medium step
// takes about 20 s (a forward pass about 6 s), so on that backend the medium model runs only
// when PEFT_BENCH_MODELS names it (otherwise its sub-benchmarks are skipped, saying so), and
//
//	go test -run '^$' -bench Llama -benchtime 3x ./peft/bench/
//
// runs stories260K only. With XLA or BLAS both models run by default. PEFT_BENCH_MODELS is a
// comma-separated list of model names (stories260K, medium); -bench selects cases:
//
//	PEFT_BENCH_MODELS=medium go test -run '^$' -bench 'LlamaTrainStep/medium/(full|lora)$' -benchtime 2x -timeout 30m ./peft/bench/
//	PEFT_BENCH_MODELS=medium go test -run '^$' -bench 'LlamaInference/medium/(base|lora-)' -benchtime 2x -timeout 30m ./peft/bench/
//
// go test's default -timeout (10 minutes) can be too short for the medium model: pass -timeout.
// The stock GoMLX executors (the "before" of the README's table) run with PEFT_GOEXEC=off.
// Each case also reports cpu-ms/op, the process's CPU time per op (all threads): on a shared
// machine it moves less than wall time (waiting for a core does not count), and the summary
// tables give ratios of both. Where the backend uses more than one core, CPU time exceeds wall
// time. GFLOP/s counts the matrix products only (2 per multiply-add, as goexec counts them on
// the pure-Go backend; "-" on XLA).

import (
	"fmt"
	"math"
	"os"
	"runtime"
	"strconv"
	"strings"
	"testing"
	"text/tabwriter"
	"time"

	"github.com/gomlx/gomlx/backends"
	"github.com/gomlx/gomlx/backends/simplego"
	"github.com/gomlx/gomlx/pkg/core/shapes"
	"github.com/gomlx/gomlx/pkg/core/tensors"
	"github.com/gomlx/gomlx/pkg/ml/context"
	"github.com/gomlx/gopjrt/dtypes"
	"github.com/stretchr/testify/require"

	"peft/adapter"
	"peft/full"
	"peft/ia3"
	"peft/lora"
	"peft/peft"
	"peft/peft/backend"
	"peft/peft/backend/goexec"
	"peft/peft/llama"
	"peft/peft/pefttest"
	"peft/peft/stories260k"
	"peft/prefixtuning"
	"peft/prompttuning"
)

// Batch shape of every Llama benchmark: the PyTorch peer's default.
const (
	llamaBatch  = 8
	llamaSeqLen = 128
)

// mediumConfig is the peer's "medium" model (25.8M parameters). On the pure-Go backend one full
// fine-tuning step takes about a minute (see the comment at the top of the file).
var mediumConfig = llama.Config{VocabSize: 512, HiddenSize: 512, IntermediateSize: 1376, NumLayers: 8,
	NumHeads: 8, NumKVHeads: 8, MaxPositions: 512, RMSNormEps: 1e-5, RopeTheta: 10000}

// llamaModel is a base model the benchmarks load into a fresh context.
type llamaModel struct {
	name string
	load func(ctx *context.Context) (llama.Config, error)
}

var llamaModels = []llamaModel{
	{name: stories260k.Name, load: func(ctx *context.Context) (llama.Config, error) {
		return llama.LoadPretrainedFS(ctx, stories260k.FS())
	}},
	{name: "medium", load: func(ctx *context.Context) (llama.Config, error) {
		return mediumConfig, llama.Init(ctx, mediumConfig, 0, 1)
	}},
}

// llamaMethod is a fine-tuning method as the Llama benchmarks run it (the peer's settings).
type llamaMethod struct {
	name string
	new  func() (peft.Method, error)
}

func loraQV() (peft.Method, error) { return lora.New(lora.DefaultConfig()) } // r=8, α=8, q_proj, v_proj

func loraAllLinear() (peft.Method, error) {
	cfg := lora.DefaultConfig()
	cfg.TargetModules = peft.TargetPattern(peft.AllLinear)
	return lora.New(cfg)
}

func doraQV() (peft.Method, error) { // LoRA's settings with DoRA's magnitudes
	cfg := lora.DefaultConfig()
	cfg.UseDoRA = true
	return lora.New(cfg)
}

func ia3Default() (peft.Method, error) { return ia3.New(ia3.DefaultConfig()) } // k, v, down_proj

func prefixTuning() (peft.Method, error) { // 20 virtual tokens through PEFT's MLP
	cfg := prefixtuning.DefaultConfig()
	cfg.PrefixProjection = true
	return prefixtuning.New(cfg)
}

func pfeiffer() (peft.Method, error) { return adapter.New(adapter.Pfeiffer()) } // reduction 16, relu

func promptTuning() (peft.Method, error) {
	cfg := prompttuning.DefaultConfig()
	cfg.NumVirtualTokens = 20
	return prompttuning.New(cfg)
}

var llamaMethods = []llamaMethod{
	{"full", func() (peft.Method, error) { return full.New(full.DefaultConfig()) }},
	{"lora", loraQV},
	{"lora-all-linear", loraAllLinear},
	{"dora", doraQV},
	{"ia3", ia3Default},
	{"adapter-pfeiffer", pfeiffer},
	{"prompt-tuning", promptTuning},
	{"prefix-tuning", prefixTuning},
}

// slowOnPureGo names the models that only run on the pure-Go backend without a BLAS library when
// PEFT_BENCH_MODELS asks for them: there a medium train step takes about 20 s, too long for
// `go test -bench .`.
var slowOnPureGo = map[string]bool{"medium": true}

// modelSkips says, for each model, why it does not run ("" when it runs). PEFT_BENCH_MODELS, a
// comma-separated list of model names (case-insensitive), selects models; unset, every model
// runs except, on the pure-Go backend without BLAS, those in slowOnPureGo. An unknown name is an
// error.
func modelSkips(bk backends.Backend) (map[string]string, error) {
	skips := map[string]string{}
	env := strings.TrimSpace(os.Getenv("PEFT_BENCH_MODELS"))
	if env == "" {
		_, pureGo := bk.(*simplego.Backend)
		slowGo := pureGo && goexec.Installed() == nil // matmuls without BLAS
		for _, m := range llamaModels {
			if slowGo && slowOnPureGo[m.name] {
				skips[m.name] = fmt.Sprintf("%s runs on the pure-Go backend without BLAS only when asked for (about 20 s per train step, "+
					"10 minutes in all at -benchtime 2x): set PEFT_BENCH_MODELS=%s (or %s,%s) and pass -timeout 60m",
					m.name, m.name, stories260k.Name, m.name)
			}
		}
		return skips, nil
	}
	names := make([]string, len(llamaModels))
	for i, m := range llamaModels {
		names[i] = m.name
		skips[m.name] = fmt.Sprintf("PEFT_BENCH_MODELS=%q leaves out %s", env, m.name)
	}
	for _, want := range strings.Split(env, ",") {
		want = strings.TrimSpace(want)
		if want == "" {
			continue
		}
		found := false
		for _, m := range llamaModels {
			if strings.EqualFold(m.name, want) {
				skips[m.name], found = "", true
			}
		}
		if !found {
			return nil, fmt.Errorf("PEFT_BENCH_MODELS: unknown model %q (known: %s)", want, strings.Join(names, ", "))
		}
	}
	return skips, nil
}

// forEachModel runs fn as the sub-benchmark of each model; the models that do not run are
// skipped with the reason.
func forEachModel(b *testing.B, table *summary, fn func(b *testing.B, model llamaModel)) {
	bk, err := backend.Get()
	require.NoError(b, err)
	skips, err := modelSkips(bk)
	require.NoError(b, err)
	for _, model := range llamaModels {
		b.Run(model.name, func(b *testing.B) {
			if reason := skips[model.name]; reason != "" {
				table.skipped = append(table.skipped, model.name+": "+reason) // shown without -v too
				b.Skip(reason)
			}
			fn(b, model)
		})
	}
}

// randomTokens is a deterministic batch of token ids [llamaBatch, llamaSeqLen].
func randomTokens(vocab int, seed uint64) *tensors.Tensor {
	rng := peft.NewRand(seed)
	ids := make([][]int32, llamaBatch)
	for i := range ids {
		ids[i] = make([]int32, llamaSeqLen)
		for j := range ids[i] {
			ids[i][j] = int32(rng.IntN(vocab))
		}
	}
	return tensors.FromValue(ids)
}

// newLlama loads model into a fresh context and applies method (nil: the plain model).
func newLlama(model llamaModel, method peft.Method) (*peft.Model, llama.Config, error) {
	bk, err := backend.Get()
	if err != nil {
		return nil, llama.Config{}, err
	}
	ctx := context.New()
	cfg, err := model.load(ctx)
	if err != nil {
		return nil, cfg, err
	}
	m, err := peft.NewModel(bk, ctx, llama.CausalLM(cfg), method, shapes.Make(dtypes.Int32, llamaBatch, llamaSeqLen))
	return m, cfg, err
}

// heldBytes is the memory of every variable in ctx: weights, the method's variables, optimizer
// state and the trainer's counters.
func heldBytes(ctx *context.Context) int64 {
	var total int64
	for v := range ctx.IterVariables() {
		total += int64(v.Shape().Memory())
	}
	return total
}

// summaryRow is one sub-benchmark's result for the summary table (the last run's, with -count).
type summaryRow struct {
	model, name string
	perOp       time.Duration
	cpuPerOp    time.Duration // process CPU time per op; 0 where unknown
	metrics     []string      // extra columns, already formatted
}

// summary collects rows in the order sub-benchmarks first report.
type summary struct {
	rows    []*summaryRow
	index   map[string]*summaryRow
	skipped []string // why models were skipped
}

func (s *summary) set(r summaryRow) {
	if s.index == nil {
		s.index = map[string]*summaryRow{}
	}
	key := r.model + "/" + r.name
	if old := s.index[key]; old != nil {
		*old = r
		return
	}
	row := r
	s.rows = append(s.rows, &row)
	s.index[key] = &row
}

// print writes the table: time per op in ms and its ratio to the model's reference row (full or
// base); "-" where the reference did not run.
func (s *summary) print(title, unit, reference string, columns []string) {
	fmt.Fprintf(os.Stdout, "\n%s (%s)\n", title, backend.Description())
	for _, why := range s.skipped {
		fmt.Fprintf(os.Stdout, "skipped %s\n", why)
	}
	if len(s.rows) == 0 {
		return
	}
	tw := tabwriter.NewWriter(os.Stdout, 0, 0, 2, ' ', tabwriter.AlignRight)
	fmt.Fprintf(tw, "model\tcase\t%s\t× %s\tcpu %s\t× %s (cpu)\t%s\t\n", unit, reference, unit, reference, strings.Join(columns, "\t"))
	ms := func(d time.Duration) string {
		if d <= 0 {
			return "-"
		}
		return fmt.Sprintf("%.1f", float64(d)/float64(time.Millisecond))
	}
	for _, r := range s.rows {
		ratio, cpuRatio := "-", "-"
		if ref := s.index[r.model+"/"+reference]; ref != nil {
			if ref.perOp > 0 {
				ratio = fmt.Sprintf("%.2f", float64(r.perOp)/float64(ref.perOp))
			}
			if ref.cpuPerOp > 0 && r.cpuPerOp > 0 {
				cpuRatio = fmt.Sprintf("%.2f", float64(r.cpuPerOp)/float64(ref.cpuPerOp))
			}
		}
		extra := strings.Join(r.metrics, "\t")
		if extra != "" {
			extra += "\t"
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\t%s\n", r.model, r.name, ms(r.perOp), ratio, ms(r.cpuPerOp), cpuRatio, extra)
	}
	_ = tw.Flush()
	fmt.Fprintln(os.Stdout)
}

// BenchmarkLlamaTrainStep times one training step (forward, next-token loss, backward, AdamW) of
// each method on each model, and reports tokens/s, the trainable share, the bytes of trainable
// parameters plus optimizer state, and the bytes of every variable held (weights + method +
// optimizer state). It ends with a summary table: ms per step and the ratio to full fine-tuning.
func BenchmarkLlamaTrainStep(b *testing.B) {
	var table summary
	forEachModel(b, &table, func(b *testing.B, model llamaModel) {
		for _, method := range llamaMethods {
			b.Run(method.name, func(b *testing.B) {
				runtime.GC() // let the previous case's model go before building this one
				meth, err := method.new()
				require.NoError(b, err)
				m, cfg, err := newLlama(model, meth)
				require.NoError(b, err)
				trainer, err := peft.NewTrainer(m, peft.TrainConfig{Steps: 1 << 30, Decay: peft.ConstantDecay,
					Loss: peft.NextTokenLoss, Progress: peft.ProgressOff})
				require.NoError(b, err)
				ids := randomTokens(cfg.VocabSize, 1)
				ds := peft.NewDataset("random-tokens", []peft.Batch{{
					Inputs: []*tensors.Tensor{ids}, Labels: []*tensors.Tensor{ids}}}, true)
				_, err = trainer.TrainSteps(ds, 1) // compiles the step
				require.NoError(b, err)
				var meter stepMeter
				meter.start()
				for b.Loop() { // the setup above runs once, untimed, whatever -benchtime says
					if _, err := trainer.TrainSteps(ds, 1); err != nil {
						b.Fatal(err)
					}
				}
				cpuPerStep, gflops := meter.stop(b)
				perStep := b.Elapsed() / time.Duration(b.N)
				losses := trainer.Losses()
				report := m.Report()
				var trainBytes int64
				for _, tv := range m.TrainableVariables() {
					trainBytes += int64(tv.Variable.Shape().Memory())
				}
				trainBytes += peft.OptimizerStateBytes(m.Context())
				held := heldBytes(m.Context())
				tokensPerSec := float64(llamaBatch*llamaSeqLen) / perStep.Seconds()
				loss := math.NaN()
				if len(losses) > 0 {
					loss = losses[len(losses)-1]
				}
				b.ReportMetric(tokensPerSec, "tokens/s")
				b.ReportMetric(report.Percent(), "trainable%")
				b.ReportMetric(float64(report.Trainable), "trainable_params")
				b.ReportMetric(float64(trainBytes), "train_state_bytes")
				b.ReportMetric(float64(held), "held_bytes")
				b.ReportMetric(loss, "loss")
				table.set(summaryRow{model: model.name, name: method.name, perOp: perStep, cpuPerOp: cpuPerStep, metrics: []string{
					fmt.Sprintf("%.0f", tokensPerSec),
					gflopsCell(gflops),
					loadAverage(),
					peft.Thousands(report.Trainable),
					fmt.Sprintf("%.3f", report.Percent()),
					peft.Thousands(trainBytes),
					peft.Thousands(held),
					fmt.Sprintf("%.4f", loss),
				}})
			})
		}
	})
	table.print(fmt.Sprintf("Llama train step, batch %d × %d", llamaBatch, llamaSeqLen),
		"ms/step", "full", []string{"tokens/s", "matmul GFLOP/s", "load", "trainable", "trainable %", "train-state bytes", "held bytes", "last loss"})
}

// inferenceCase is one row of BenchmarkLlamaInference: a method (nil: the base model), merged or
// not.
type inferenceCase struct {
	name   string
	method func() (peft.Method, error)
	merge  bool
}

var llamaInferenceCases = []inferenceCase{
	{name: "base"},
	{name: "lora-unmerged", method: loraQV},
	{name: "lora-merged", method: loraQV, merge: true},
	{name: "lora-all-linear-unmerged", method: loraAllLinear},
	{name: "lora-all-linear-merged", method: loraAllLinear, merge: true},
	{name: "dora-unmerged", method: doraQV},
	{name: "ia3-unmerged", method: ia3Default},
	{name: "adapter-pfeiffer", method: pfeiffer},
	{name: "prompt-tuning", method: promptTuning},
	{name: "prefix-tuning", method: prefixTuning},
}

// BenchmarkLlamaInference times one forward pass (m.Call) of the batch: the base model, LoRA
// (q,v and all-linear) unmerged and merged, the Pfeiffer adapter and prompt tuning. LoRA's B is
// made non-zero first, as after training (as the peer does), so merging really changes the
// weights; the merged cases report the largest difference between merged and unmerged logits.
// It ends with a summary table: ms per call and the ratio to the base model.
func BenchmarkLlamaInference(b *testing.B) {
	var table summary
	forEachModel(b, &table, func(b *testing.B, model llamaModel) {
		for _, tc := range llamaInferenceCases {
			b.Run(tc.name, func(b *testing.B) {
				runtime.GC()
				var meth peft.Method
				if tc.method != nil {
					var err error
					meth, err = tc.method()
					require.NoError(b, err)
				}
				m, cfg, err := newLlama(model, meth)
				require.NoError(b, err)
				ids := randomTokens(cfg.VocabSize, 2)
				if _, isLoRA := meth.(*lora.LoRA); isLoRA {
					pefttest.SetRandomB(b, m, 3, 0.02)
				}
				var unmerged []float32
				if tc.merge {
					unmerged = callFlat(b, m, ids)
					require.NoError(b, m.Merge())
				}
				got := callFlat(b, m, ids) // compiles the graph that is timed
				var meter stepMeter
				meter.start()
				for b.Loop() {
					out, err := m.Call(ids)
					if err != nil {
						b.Fatal(err)
					}
					for _, t := range out {
						_ = t.FinalizeAll()
					}
				}
				cpuPerCall, gflops := meter.stop(b)
				perCall := b.Elapsed() / time.Duration(b.N)
				tokensPerSec := float64(llamaBatch*llamaSeqLen) / perCall.Seconds()
				b.ReportMetric(tokensPerSec, "tokens/s")
				extra := []string{fmt.Sprintf("%.0f", tokensPerSec), gflopsCell(gflops), loadAverage(), ""}
				if tc.merge {
					diff := maxAbsDiff(unmerged, got)
					b.ReportMetric(diff, "merge_max_abs_diff")
					extra[3] = fmt.Sprintf("%.2g", diff)
				}
				table.set(summaryRow{model: model.name, name: tc.name, perOp: perCall, cpuPerOp: cpuPerCall, metrics: extra})
			})
		}
	})
	table.print(fmt.Sprintf("Llama inference, batch %d × %d", llamaBatch, llamaSeqLen),
		"ms/call", "base", []string{"tokens/s", "matmul GFLOP/s", "load", "merged vs unmerged max |Δ|"})
}

// callFlat runs m on ids and returns its logits flattened.
func callFlat(b *testing.B, m *peft.Model, ids *tensors.Tensor) []float32 {
	b.Helper()
	out, err := m.Call(ids)
	require.NoError(b, err)
	defer func() {
		for _, t := range out {
			_ = t.FinalizeAll()
		}
	}()
	require.Equal(b, dtypes.Float32, out[0].DType(), "logits")
	return tensors.MustCopyFlatData[float32](out[0])
}

func maxAbsDiff(a, c []float32) float64 {
	if len(a) != len(c) {
		return math.Inf(1)
	}
	var d float64
	for i := range a {
		d = max(d, math.Abs(float64(a[i])-float64(c[i])))
	}
	return d
}

// stepMeter measures, over a benchmark loop, the CPU time the process spends (all threads, user
// and system, from /proc/self/stat) and the matrix products' multiply-adds (counted by
// peft/backend/goexec on the pure-Go backend). When other jobs share the cores, CPU time is the
// steadier of the two times, since waiting for a core does not count; where the backend runs one
// op on several cores it exceeds wall time. Where /proc is missing (not Linux) or the backend
// is not pure Go, the figure it cannot know is reported as missing.
type stepMeter struct {
	t0    time.Duration
	ok    bool
	macs0 int64
}

func (c *stepMeter) start() {
	c.t0, c.ok = processCPU()
	c.macs0 = goexec.Counts().MACs
}

// stop reports and returns, per iteration of the loop that just ended, the CPU time (0 if
// unknown) and the matrix products' GFLOP/s over wall time (2 per multiply-add; 0 if unknown).
func (c *stepMeter) stop(b *testing.B) (cpu time.Duration, gflops float64) {
	if b.N == 0 {
		return 0, 0
	}
	if t1, ok := processCPU(); c.ok && ok {
		cpu = (t1 - c.t0) / time.Duration(b.N)
		b.ReportMetric(float64(cpu)/float64(time.Millisecond), "cpu-ms/op")
	}
	if macs := goexec.Counts().MACs - c.macs0; macs > 0 {
		gflops = 2 * float64(macs) / b.Elapsed().Seconds() / 1e9
		b.ReportMetric(gflops, "GFLOP/s")
	}
	return cpu, gflops
}

// loadAverage is the machine's one-minute load average from /proc/loadavg ("-" where unknown):
// the benchmarks show it beside each figure, since these machines are shared.
func loadAverage() string {
	data, err := os.ReadFile("/proc/loadavg")
	if err != nil {
		return "-"
	}
	if f := strings.Fields(string(data)); len(f) > 0 {
		return f[0]
	}
	return "-"
}

// gflopsCell formats a GFLOP/s figure for the summary tables.
func gflopsCell(g float64) string {
	if g <= 0 {
		return "-"
	}
	return fmt.Sprintf("%.1f", g)
}

// processCPU returns the process's user + system CPU time from /proc/self/stat (fields 14 and 15,
// in USER_HZ ticks, which Linux fixes at 100 per second for user space).
func processCPU() (time.Duration, bool) {
	data, err := os.ReadFile("/proc/self/stat")
	if err != nil {
		return 0, false
	}
	// The command name (field 2) is in parentheses and may contain spaces: count from after it.
	end := strings.LastIndexByte(string(data), ')')
	if end < 0 {
		return 0, false
	}
	fields := strings.Fields(string(data[end+1:])) // fields[0] is field 3 (state)
	if len(fields) < 13 {
		return 0, false
	}
	utime, err1 := strconv.ParseInt(fields[11], 10, 64)
	stime, err2 := strconv.ParseInt(fields[12], 10, 64)
	if err1 != nil || err2 != nil {
		return 0, false
	}
	const tick = 10 * time.Millisecond
	return time.Duration(utime+stime) * tick, true
}
