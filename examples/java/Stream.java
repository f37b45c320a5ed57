// Streams a completion from the bundled model token by token, as a chat UI would, then a
// second turn in the same session, and prints what the KV cache holds.
//
//   cmake --build build --target example-java             # after tools/test.sh
//   java -Djava.library.path=build/lib -cp build/bindings/java/pyramid.jar \
//        examples/java/Stream.java ['prompt' ...]
//
// Greedy (temperature 0), so the first turn is the text of
// `build/bin/pyramid-cli --prompt 'def fibonacci(n):' --temperature 0 --max-tokens 64`.

import io.pyramid.Model;
import io.pyramid.Session;

public class Stream {
    public static void main(String[] args) {
        String[] turns = args.length > 0 ? args : new String[] {"def fibonacci(n):", "\n\ndef factorial(n):"};
        try (Model model = new Model();
             Session session = new Session(model, p -> {
                 p.setTemperature(0);
                 p.setMaxTokens(64);
             })) {
            System.out.println("pyramid " + Model.version() + " on " + model.device() + ": " + model.path());
            for (String prompt : turns) {
                System.out.println("\n>>> " + prompt.replace("\n", "\\n"));
                System.out.print(prompt);
                for (String piece : session.generate(prompt)) { // the history carries over
                    System.out.print(piece);
                    System.out.flush();
                }
                System.out.println();
            }
            System.out.println();
            System.out.println(session.memory());
        }
    }
}
