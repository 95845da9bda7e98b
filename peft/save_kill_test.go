package peft_test

import (
	"bufio"
	"fmt"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/gomlx/gomlx/pkg/core/tensors"
	"github.com/stretchr/testify/require"

	"peft/full"
	"peft/lora"
	"peft/peft"
	"peft/peft/pefttest"
)

// TestMain lets a test run a saving loop in a child process (the test binary re-executed with
// PEFT_SAVE_LOOP set) that the test then kills at a random instant.
func TestMain(m *testing.M) {
	if spec := os.Getenv("PEFT_SAVE_LOOP"); spec != "" {
		method, dir, _ := strings.Cut(spec, ":")
		saveLoop(method, dir)
		os.Exit(0)
	}
	os.Exit(m.Run())
}

// killMethod builds the method of a kill test: LoRA saves PEFT's layout (two files), full
// fine-tuning this SDK's Hugging Face folder (three).
func killMethod(name string) peft.Method {
	var method peft.Method
	var err error
	switch name {
	case "lora":
		method, err = lora.New(lora.DefaultConfig())
	case "full":
		method, err = full.New(full.DefaultConfig())
	}
	if err != nil {
		panic(err)
	}
	return method
}

// fill sets every trainable value of m to v.
func fill(m *peft.Model, v float32) error {
	for _, tv := range m.TrainableVariables() {
		values := make([]float32, tv.Variable.Shape().Size())
		for i := range values {
			values[i] = v
		}
		if err := tv.Variable.SetValue(tensors.FromFlatDataAndDimensions(values, tv.Variable.Shape().Dimensions...)); err != nil {
			return err
		}
	}
	return nil
}

// saveLoop saves the model into dir over and over, every value 1 then every value 2, until it is
// killed; it prints a line after each save.
func saveLoop(method, dir string) {
	tb := &testing.T{}
	_, m := pefttest.StoriesModel(tb, killMethod(method))
	for i := 0; ; i++ {
		if err := fill(m, float32(1+i%2)); err != nil {
			panic(err)
		}
		if err := m.Save(dir); err != nil {
			panic(err)
		}
		fmt.Println("saved")
	}
}

// kills is how many times each kill test kills a saving process: a few in CI, more with
// PEFT_KILLS set.
func kills() int {
	if n, err := strconv.Atoi(os.Getenv("PEFT_KILLS")); err == nil && n > 0 {
		return n
	}
	return 12
}

// A save killed at any instant leaves a folder that loads as the previous save or the new one,
// never a mix and never an error; the next save removes what the killed one left behind.
func TestSaveSurvivesKill(t *testing.T) {
	if testing.Short() {
		t.Skip("kills child processes")
	}
	for _, method := range []string{"lora", "full"} {
		t.Run(method, func(t *testing.T) {
			dir := filepath.Join(t.TempDir(), "adapter")
			rng := rand.New(rand.NewPCG(uint64(len(method)), 1))
			seen := map[float32]int{}
			for k := range kills() {
				cmd := exec.Command(os.Args[0], "-test.run=^$")
				cmd.Env = append(os.Environ(), "PEFT_SAVE_LOOP="+method+":"+dir)
				stdout, err := cmd.StdoutPipe()
				require.NoError(t, err)
				require.NoError(t, cmd.Start())
				lines := bufio.NewReader(stdout)
				for range 1 + rng.IntN(3) { // let one to three saves complete, then kill during a later one
					line, err := lines.ReadString('\n')
					require.NoError(t, err)
					require.Equal(t, "saved\n", line)
				}
				time.Sleep(time.Duration(rng.IntN(3000)) * time.Microsecond)
				require.NoError(t, cmd.Process.Kill())
				_ = cmd.Wait()

				_, m := pefttest.StoriesModel(t, killMethod(method))
				require.NoError(t, m.Load(dir), "kill %d", k)
				var value float32
				for _, tv := range m.TrainableVariables() {
					v, err := peft.Float32s(tv.Variable)
					require.NoError(t, err)
					for _, x := range v {
						if value == 0 {
							value = x
						}
						require.Equal(t, value, x, "kill %d: %s mixes two saves", k, tv.Variable.ScopeAndName())
					}
				}
				seen[value]++
			}
			t.Logf("%d kills: the folder loaded %d times, as save 1 %d times and save 2 %d times", kills(), seen[1]+seen[2], seen[1], seen[2])
			require.Equal(t, kills(), seen[1]+seen[2])

			// A save after the kills leaves no hidden leftovers.
			_, m := pefttest.StoriesModel(t, killMethod(method))
			require.NoError(t, m.Save(dir))
			entries, err := os.ReadDir(dir)
			require.NoError(t, err)
			for _, e := range entries {
				require.False(t, strings.HasPrefix(e.Name(), "."), "leftover %s", e.Name())
			}
		})
	}
}
