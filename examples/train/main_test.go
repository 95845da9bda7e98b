package main

import (
	"bytes"
	"encoding/json"
	"flag"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"peft/peft"
	"peft/peft/safetensors"
)

// TestMain lets a test run the command in a child process: the test binary re-executed with
// TRAIN_AS_COMMAND=1 runs main with the arguments after "--".
func TestMain(m *testing.M) {
	if os.Getenv("TRAIN_AS_COMMAND") == "1" {
		for i, a := range os.Args {
			if a == "--" {
				os.Args = append([]string{"train"}, os.Args[i+1:]...)
				break
			}
		}
		flag.CommandLine = flag.NewFlagSet("train", flag.ExitOnError)
		main()
		os.Exit(0)
	}
	os.Exit(m.Run())
}

// command returns the command line run in a child process.
func command(args ...string) *exec.Cmd {
	cmd := exec.Command(os.Args[0], append([]string{"-test.run=^$", "--"}, args...)...)
	cmd.Env = append(os.Environ(), "TRAIN_AS_COMMAND=1")
	return cmd
}

func baseOptions(out string) options {
	return options{Data: "testdata", Method: "lora", Out: out, Steps: 8, Batch: 4, Seq: 48, LR: 1e-2, Warmup: -1,
		GradAccum: 1, EvalEvery: 4, ValidShare: 0.1, Rank: 4, VirtualTokens: 4}
}

// A short run on the example dataset writes everything the command promises, and its
// validation loss falls.
func TestTrainWritesTheRun(t *testing.T) {
	out := filepath.Join(t.TempDir(), "run")
	var log bytes.Buffer
	o := baseOptions(out)
	o.output = &log
	res, err := run(o)
	require.NoError(t, err, log.String())
	require.Equal(t, "lora", res.Method)
	require.Equal(t, 8, res.Steps)
	require.Equal(t, int64(4480), res.TrainableParams) // rank 4 on q_proj and v_proj of 5 layers: 5·2·4·(64+64)
	require.Less(t, res.ValidLossAfter, res.ValidLossBefore-0.5)
	for _, f := range []string{peft.AdapterConfigFile, peft.AdapterWeightsFile, "loss.png", "log.jsonl",
		"best/" + peft.AdapterWeightsFile, "checkpoint-4/" + peft.TrainerStateFile, "checkpoint-8/" + peft.TrainerTensorsFile} {
		require.FileExists(t, filepath.Join(out, f))
	}
	logLines := strings.Split(strings.TrimSpace(readFile(t, filepath.Join(out, "log.jsonl"))), "\n")
	require.Len(t, logLines, 2)
	var last evalPoint
	require.NoError(t, json.Unmarshal([]byte(logLines[1]), &last))
	require.Equal(t, 8, last.Step)
	require.Equal(t, res.ValidLossAfter, last.ValidLoss)
	require.Contains(t, log.String(), "320 records → 320 examples")
	require.Contains(t, log.String(), "step 8/8")

	// Every method trains on the same data.
	for _, tc := range []struct {
		method string
		dora   bool
	}{{"qlora", false}, {"lora", true}, {"adalora", false}, {"ia3", false}, {"adapter", false}, {"prompt-tuning", false},
		{"prefix-tuning", false}, {"full", false}} {
		name, method := tc.method, tc.method
		if tc.dora {
			name += " -dora"
		}
		t.Run(name, func(t *testing.T) {
			o := baseOptions(filepath.Join(t.TempDir(), method))
			o.Method, o.DoRA, o.Steps, o.EvalEvery = method, tc.dora, 2, 2
			o.LR = map[string]float64{"full": 1e-3, "prompt-tuning": 3e-2, "ia3": 1e-1, "prefix-tuning": 3e-2}[method]
			if o.LR == 0 {
				o.LR = 1e-2
			}
			res, err := run(o)
			require.NoError(t, err)
			require.Less(t, res.ValidLossAfter, res.ValidLossBefore)
		})
	}
}

// A run killed at any moment and resumed with the same command line ends with the same adapter,
// tensor for tensor, as the run never interrupted; a resumed run with other settings is refused.
func TestResumeAfterKill(t *testing.T) {
	if testing.Short() {
		t.Skip("runs the command three times in child processes")
	}
	dir := t.TempDir()
	args := func(out string) []string {
		return []string{"-data", "testdata", "-method", "lora", "-steps", "12", "-eval-every", "3", "-batch", "4", "-seq", "48",
			"-lr", "1e-2", "-dropout", "0.1", "-grad-accum", "2", "-out", out, "-resume"}
	}
	whole := filepath.Join(dir, "whole")
	outWhole, err := command(args(whole)...).CombinedOutput()
	require.NoError(t, err, string(outWhole))

	killed := filepath.Join(dir, "killed")
	cmd := command(args(killed)...)
	var killedOut bytes.Buffer
	cmd.Stdout, cmd.Stderr = &killedOut, &killedOut
	require.NoError(t, cmd.Start())
	deadline := time.Now().Add(2 * time.Minute)
	for {
		_, err := os.Stat(filepath.Join(killed, "checkpoint-6", peft.TrainerStateFile))
		if err == nil {
			break
		}
		require.True(t, time.Now().Before(deadline), "no checkpoint-6 after 2 minutes: %s", killedOut.String())
		time.Sleep(10 * time.Millisecond)
	}
	require.NoError(t, cmd.Process.Kill())
	_ = cmd.Wait()
	_, err = os.Stat(filepath.Join(killed, peft.AdapterWeightsFile))
	require.ErrorIs(t, err, os.ErrNotExist, "the run was killed before it finished")

	resumed, err := command(args(killed)...).CombinedOutput()
	require.NoError(t, err, string(resumed))
	require.Contains(t, string(resumed), "resumed from")
	want, got := readTensors(t, whole), readTensors(t, killed)
	require.Len(t, got, len(want))
	for name, w := range want {
		require.Equal(t, w, got[name], name)
	}

	other := append(args(killed), "-lr", "2e-2")
	refused, err := command(other...).CombinedOutput()
	require.Error(t, err)
	require.Contains(t, string(refused), "was made by another run: it has -lr 0.01, this command 0.02")
}

func readTensors(t *testing.T, dir string) map[string][]byte {
	t.Helper()
	f, err := safetensors.Read(filepath.Join(dir, peft.AdapterWeightsFile))
	require.NoError(t, err)
	out := map[string][]byte{}
	for _, tensor := range f.Tensors {
		out[tensor.Name] = tensor.Data
	}
	return out
}

func readFile(t *testing.T, path string) string {
	t.Helper()
	data, err := os.ReadFile(path)
	require.NoError(t, err)
	return string(data)
}

// -patience stops the run after that many validations without improvement, and the last
// checkpoint is the step it stopped at.
func TestEarlyStopping(t *testing.T) {
	o := baseOptions(filepath.Join(t.TempDir(), "run"))
	// Too small a rate to change the loss by more than the threshold (it may move it by float32
	// rounding, which a threshold of 0 would count as improvement).
	o.Steps, o.EvalEvery, o.Patience, o.PatienceThreshold, o.LR = 10, 1, 2, 1e-3, 1e-9
	res, err := run(o)
	require.NoError(t, err)
	require.True(t, res.StoppedEarly)
	require.Equal(t, 1, res.BestStep)
	require.DirExists(t, filepath.Join(o.Out, "checkpoint-3"))
	require.NoDirExists(t, filepath.Join(o.Out, "checkpoint-4"))
	require.Equal(t, readFile(t, filepath.Join(o.Out, "best", peft.AdapterWeightsFile)), readFile(t, filepath.Join(o.Out, peft.AdapterWeightsFile)),
		"after an early stop the folder holds the best adapter")
	require.Equal(t, 3, res.Steps, "the steps that ran")
}

// A new run into a folder that holds one is refused; -resume continues it, and with nothing to
// continue says so. Only the newest -keep-checkpoints folders stay, and the model's tokenizer is
// copied beside the adapter.
func TestOutFolder(t *testing.T) {
	var log bytes.Buffer
	o := baseOptions(filepath.Join(t.TempDir(), "run"))
	o.Resume, o.KeepCheckpoints, o.EvalEvery, o.output = true, 1, 2, &log
	_, err := run(o)
	require.NoError(t, err)
	require.Contains(t, log.String(), "no checkpoint in "+o.Out+": starting a new run")
	entries, err := os.ReadDir(o.Out)
	require.NoError(t, err)
	var names []string
	for _, e := range entries {
		if !strings.HasPrefix(e.Name(), ".") {
			names = append(names, e.Name())
		}
	}
	require.Equal(t, []string{peft.AdapterConfigFile, peft.AdapterWeightsFile, "best", "checkpoint-8", "log.jsonl", "loss.png", "tokenizer.json", "tokenizer_config.json"}, names)

	o.Resume = false
	_, err = run(o)
	require.ErrorContains(t, err, "already holds a run (checkpoint-8): continue it with -resume, or give another -out")
}

// Bad command lines and data are errors that say what is wrong.
func TestErrors(t *testing.T) {
	dir := t.TempDir()
	chatData := filepath.Join(dir, "chat.jsonl")
	var lines string
	for range 20 {
		lines += `{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}` + "\n"
	}
	require.NoError(t, os.WriteFile(chatData, []byte(lines), 0o644))
	bad := filepath.Join(dir, "bad.jsonl")
	require.NoError(t, os.WriteFile(bad, []byte(`{"prompt": "a", "completion": "b"}`+"\n"+`{"prompt": "a"}`+"\n"), 0o644))
	for _, tc := range []struct {
		name   string
		mutate func(*options)
		want   string
	}{
		{"no data", func(o *options) { o.Data = "" }, "-data is required"},
		{"unknown method", func(o *options) { o.Method = "dora" }, `-method "dora": want lora, qlora`},
		{"DoRA on adapters", func(o *options) { o.Method, o.DoRA = "adapter", true }, `-dora applies to -method lora or qlora, not "adapter"`},
		{"no virtual tokens", func(o *options) { o.Method, o.VirtualTokens = "prompt-tuning", 0 }, "-virtual-tokens must be > 0, got 0"},
		{"prefix longer than the model", func(o *options) { o.Method, o.VirtualTokens = "prefix-tuning", 500 },
			"-virtual-tokens 500 plus -seq 48 is 548, more than the 512 positions of -model stories260K"},
		{"bad line", func(o *options) { o.Data = bad }, `bad.jsonl:2: a prompt/completion record without "completion"`},
		{"chat data, no template", func(o *options) { o.Data = chatData }, "holds chat records, and -model stories260K: chat: tokenizer_config.json: field chat_template: the model has no chat template"},
		{"misspelt target", func(o *options) { o.Targets = "q_proj, v_porj" }, `-targets: the model has no linear layer named "v_porj" (it has down_proj, gate_proj, k_proj, o_proj, q_proj, up_proj, v_proj)`},
		{"negative rate", func(o *options) { o.LR = -1 }, "-lr must be > 0, got -1"},
		{"folder without valid.jsonl", func(o *options) { o.Data = dir }, "has no train.jsonl: a folder needs train.jsonl and valid.jsonl; or give one .jsonl file"},
		{"too few records to split", func(o *options) { o.Data = filepath.Join("testdata", "valid.jsonl"); o.ValidShare = 0.01 }, "holds out 0 of them"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			o := baseOptions(filepath.Join(dir, tc.name))
			tc.mutate(&o)
			_, err := run(o)
			require.ErrorContains(t, err, tc.want)
		})
	}
}

// -forgetting reports the loss on general text before and after: full fine-tuning at a high rate
// on the colour questions costs more of it than LoRA does.
func TestForgettingReport(t *testing.T) {
	dir := t.TempDir()
	general := filepath.Join(dir, "general.jsonl")
	require.NoError(t, os.WriteFile(general, []byte(`{"text": "Once upon a time, there was a little girl named Lily. She loved to play outside in the park."}`+"\n"+
		`{"text": "One day, Tom went to the store with his mom. He wanted to buy a big red ball."}`+"\n"), 0o644))
	cost := map[string]float64{}
	for _, method := range []string{"lora", "full"} {
		o := baseOptions(filepath.Join(dir, method))
		o.Method, o.Forgetting, o.Steps = method, general, 12
		o.LR = map[string]float64{"lora": 1e-2, "full": 1e-2}[method]
		res, err := run(o)
		require.NoError(t, err)
		require.NotNil(t, res.ForgettingBefore)
		require.NotNil(t, res.ForgettingAfter)
		cost[method] = *res.ForgettingAfter - *res.ForgettingBefore
	}
	t.Logf("loss on general text rose by %.3f with LoRA, %.3f with full fine-tuning", cost["lora"], cost["full"])
	require.Greater(t, cost["full"], cost["lora"])
	require.Greater(t, cost["full"], 0.0)
}

// A resumed run with other method options is told which flags differ, by name.
func TestMethodOptionDifferences(t *testing.T) {
	for _, tc := range []struct {
		name, a, b string
		want       []string
	}{
		{"same", `{"r": 8, "seed": 0}`, `{"r": 8, "seed": 0}`, nil},
		{"a flag's field", `{"r": 8, "use_dora": true}`, `{"r": 8}`, []string{"-dora (use_dora) true, this command the default"}},
		{"several, sorted", `{"r": 8, "lora_alpha": 8, "x": 1}`, `{"r": 4, "lora_alpha": 8, "x": 2}`,
			[]string{"-rank (r) 8, this command 4", "x 1, this command 2"}},
		{"not objects", `[1]`, `{}`, []string{"method options [1], this command {}"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			require.Equal(t, tc.want, methodOptionDifferences(tc.a, tc.b))
		})
	}
}
